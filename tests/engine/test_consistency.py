"""The labeler against their earlier self: when a repeat is due, which comes back, and the agreement."""

from __future__ import annotations

import random

from rlhf.consistency import PURPOSE, pick_repeat, repeat_due, self_agreement
from rlhf.preferences import record_label


def labeled_set(store, prompt: str, kind: str = "best", choice=(0,), labeler: str = "ann") -> list[int]:
    pid = store.add_prompt(prompt)
    ids = store.add_completions(pid, [{"text": f"{prompt} {i}", "n_tokens": 1, "finish_reason": "eos",
                                       "policy_version": 0} for i in range(3)])
    record_label(store, pid, ids, kind, list(choice) if choice else None, labeler=labeler)
    return ids


def test_a_repeat_is_due_every_n_labels_of_that_labeler(store):
    for i in range(3):
        labeled_set(store, f"p{i}")
    labeled_set(store, "theirs", labeler="bob")
    assert repeat_due(store, "ann", every=3) and not repeat_due(store, "ann", every=4)
    assert not repeat_due(store, "bob", every=3) and not repeat_due(store, "ann", every=0)
    earlier = pick_repeat(store, "ann", random.Random(0))
    record_label(store, earlier.prompt_id, earlier.completion_ids, "best", earlier.choice, labeler="ann",
                 purpose=PURPOSE)
    assert not repeat_due(store, "ann", every=3)   # counting starts again after a repeat


def test_the_least_repeated_decided_comparison_comes_back(store):
    decided = labeled_set(store, "a")
    labeled_set(store, "b", kind="tie", choice=None)        # decided nothing: never repeated
    again = pick_repeat(store, "ann", random.Random(0))
    assert again.completion_ids == decided
    assert pick_repeat(store, "bob", random.Random(0)) is None


def test_self_agreement_counts_the_earlier_labels_pairs_kept(store):
    first = labeled_set(store, "a", choice=(0,))               # 0 over 1, 0 over 2
    second = labeled_set(store, "b", kind="ranking", choice=(2, 1, 0))
    pid_a, pid_b = store.comparisons()[0].prompt_id, store.comparisons()[1].prompt_id
    record_label(store, pid_a, [first[2], first[0], first[1]], "best", [1], labeler="ann", purpose=PURPOSE)
    record_label(store, pid_b, second, "best", [1], labeler="ann", purpose=PURPOSE)    # 1 > 0 kept; 2 > ... lost
    record_label(store, pid_b, second, "skip", None, labeler="ann", purpose=PURPOSE)   # counts nothing
    mine = self_agreement(store, "ann")
    assert (mine.repeats, mine.pairs, mine.agreed) == (2, 5, 3.0)
    assert mine.text() == "60% of 2"
    assert len(store.pairs()) == 5 == store.stats()["pairs_labeled"]   # repeats are not training pairs
    assert self_agreement(store, "bob").text() == "—"
