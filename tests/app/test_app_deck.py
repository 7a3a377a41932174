"""The labeling deck on its own: prompt order, reuse of stored completions, shuffling."""

from __future__ import annotations

import random

from rlhf.preferences import record_label
from workbench.deck import Deck


def _rows(n: int, version: int) -> list[dict]:
    return [{"text": f"c{i}", "n_tokens": 1, "finish_reason": "eos", "policy_version": version}
            for i in range(n)]


def test_opens_on_the_first_unlabeled_prompt_and_wraps(store):
    store.add_prompts(["a", "b", "c"])
    ids = store.add_completions(1, _rows(2, 0))
    record_label(store, 1, ids, "skip")
    deck = Deck(store, k=2)
    assert deck.current_id == 2
    assert deck.next_unlabeled() == 3
    deck.go(3)
    assert deck.next_unlabeled() == 2          # wraps round, skipping labeled prompt 1
    assert (deck.labeled_count, deck.remaining_count) == (1, 2)
    assert not deck.step(1) and deck.step(-1) and deck.current_id == 2


def test_reuses_the_latest_k_of_the_current_version(store):
    store.add_prompts(["a"])
    old = store.add_completions(1, _rows(2, 0))
    new = store.add_completions(1, _rows(2, 0))
    v1 = store.add_completions(1, _rows(1, 1))
    deck = Deck(store, k=2, rng=random.Random(1))
    assert {c.id for c in deck.display_set(1, 0)} == set(new)
    assert not set(old) & {c.id for c in deck.display_set(1, 0)}
    deck.forget()
    assert deck.display_set(1, 1) is None      # only one completion of version 1: sample more
    assert deck.set_sampled(1, v1 + new[:1], 1) is None   # mixed versions are not shown


def test_exact_order_is_kept_and_sampled_sets_are_shuffled(store):
    store.add_prompts(["a"])
    ids = store.add_completions(1, _rows(6, 0))
    deck = Deck(store, k=6, rng=random.Random(3))
    shuffled = [c.id for c in deck.set_sampled(1, ids, 0)]
    assert sorted(shuffled) == ids and shuffled != ids
    reversed_ids = list(reversed(ids))
    assert [c.id for c in deck.set_exact(1, reversed_ids)] == reversed_ids
    assert [c.id for c in deck.display_set(1, 0)] == reversed_ids


def test_what_comes_next_follows_the_order(store):
    store.add_prompts(["a", "b", "c", "d", "e"])
    for pid in (2, 4, 5):                                        # sampled, waiting for a label
        store.add_completions(pid, _rows(2, 0))
    store.add_completions(3, _rows(2, 1))                        # another policy version's set
    deck = Deck(store, k=2, rng=random.Random(0))
    assert deck.current_id == 1 and deck.next_unlabeled() == 2  # as added
    assert [pid for pid, _ in deck.waiting_sets()] == [2, 4, 5]
    deck.set_order("uncertain")
    assert deck.next_unlabeled() == 2                            # nothing measured yet: as added
    assert deck.priorities_spent()                               # nothing measured: measure
    deck.priority = {2: 0.1, 4: 0.6, 5: 0.3}
    assert deck.next_unlabeled() == 4 and not deck.priorities_spent()  # the highest priority
    deck.mark_labeled(4)
    assert deck.next_unlabeled() == 5                            # then the next, by the same measure
    deck.mark_labeled(5)
    assert deck.next_unlabeled() == 2                            # prompt 3's set was not measured: after
    deck.mark_labeled(2)
    assert deck.priorities_spent()                               # every ranked set labeled: measure again
    deck.set_order("random")
    firsts = {deck.next_unlabeled() for _ in range(3)}
    assert len(firsts) == 1 and firsts <= {2, 3, 5}              # drawn once: the same until labeled
