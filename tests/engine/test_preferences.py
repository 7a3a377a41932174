"""Labels and the pairs they imply: best-of-K, rankings, pairless kinds, undo."""

from __future__ import annotations

from itertools import combinations

import pytest

from rlhf.errors import UserError
from rlhf.preferences import pairs_for_label, record_label, undo_last_label
from rlhf.store import Store


def shown(store: Store, text: str, k: int = 4) -> tuple[int, list[int]]:
    """A prompt and K completions as the labeling screen would record them."""
    prompt_id = store.add_prompt(text)
    ids = store.add_completions(prompt_id, [
        {"text": f"{text} / answer {i}", "n_tokens": 3, "finish_reason": "eos", "policy_version": 0}
        for i in range(k)])
    return prompt_id, ids


def pair_ids(store: Store) -> set[tuple[int, int]]:
    return {(p["chosen_id"], p["rejected_id"]) for p in store.pairs()}


@pytest.mark.parametrize("k", [2, 4, 6])
def test_best_of_k_gives_k_minus_1_pairs_with_the_pick_chosen(store, k):
    prompt_id, ids = shown(store, "Name a colour.", k)
    record_label(store, prompt_id, ids, "best", [1], labeler="ann", seconds=2.5)

    assert pair_ids(store) == {(ids[1], other) for other in ids if other != ids[1]}
    (comparison,) = store.comparisons()
    assert comparison.kind == "best" and comparison.choice == [1]
    assert comparison.completion_ids == ids and comparison.labeler == "ann"


def test_a_shared_top_gives_each_winner_over_each_of_the_rest(store):
    prompt_id, ids = shown(store, "Name two colours.", 4)
    record_label(store, prompt_id, ids, "best", [2, 0])

    assert pair_ids(store) == {(ids[w], ids[r]) for w in (2, 0) for r in (1, 3)}
    assert store.comparisons()[0].choice == [2, 0]
    for bad in ([0, 1, 2, 3], [1, 1]):  # every one (that is a tie) or one twice
        with pytest.raises(UserError, match="share the top"):
            record_label(store, prompt_id, ids, "best", bad)
    assert len(pair_ids(store)) == 4  # a refused label adds nothing


@pytest.mark.parametrize("ranking", [[2, 0, 3, 1], [0, 1, 2, 3], [3, 2, 1, 0]])
def test_a_ranking_gives_every_pair_better_over_worse(store, ranking):
    prompt_id, ids = shown(store, "Rank these.", 4)
    record_label(store, prompt_id, ids, "ranking", ranking)

    pairs = pair_ids(store)
    assert len(pairs) == 6  # C(4, 2)
    rank = {ids[pos]: r for r, pos in enumerate(ranking)}
    assert all(rank[chosen] < rank[rejected] for chosen, rejected in pairs)
    assert pairs == set(combinations([ids[pos] for pos in ranking], 2))


@pytest.mark.parametrize("kind", ["tie", "all_bad", "skip"])
def test_pairless_labels_are_kept_but_give_no_pairs(store, kind):
    prompt_id, ids = shown(store, "Say nothing useful.")
    record_label(store, prompt_id, ids, kind)

    assert store.pairs() == []
    assert [c.kind for c in store.comparisons()] == [kind]
    assert prompt_id not in store.unlabeled_prompt_ids()  # a skip still moves the queue on


def test_undo_removes_exactly_the_last_label_and_its_pairs(store):
    first_prompt, first_ids = shown(store, "First prompt.")
    second_prompt, second_ids = shown(store, "Second prompt.")
    first = record_label(store, first_prompt, first_ids, "best", [0])
    record_label(store, second_prompt, second_ids, "ranking", [3, 2, 1, 0])
    before_completions = store.completions(first_ids + second_ids)

    undone = undo_last_label(store)

    assert undone is not None and undone.prompt_id == second_prompt and undone.kind == "ranking"
    assert [c.id for c in store.comparisons()] == [first]
    assert pair_ids(store) == {(first_ids[0], other) for other in first_ids[1:]}
    assert store.completions(first_ids + second_ids) == before_completions  # nothing sampled is lost
    assert store.unlabeled_prompt_ids() == [second_prompt]


def test_undo_with_nothing_to_undo_returns_none(store):
    assert undo_last_label(store) is None


def test_undo_twice_walks_back_one_label_at_a_time(store):
    prompt_id, ids = shown(store, "Again.")
    record_label(store, prompt_id, ids, "tie")
    record_label(store, prompt_id, ids, "best", [2])
    undo_last_label(store)
    assert [c.kind for c in store.comparisons()] == ["tie"]
    undo_last_label(store)
    assert store.comparisons() == [] and store.pairs() == []


def test_undo_can_be_limited_to_one_labeler(store):
    prompt_id, ids = shown(store, "Two labelers.")
    mine = record_label(store, prompt_id, ids, "best", [0], labeler="me")
    record_label(store, prompt_id, ids, "best", [1], labeler="you")
    undo_last_label(store, labeler="me")
    assert [c.labeler for c in store.comparisons()] == ["you"]
    assert mine not in [c.id for c in store.comparisons()]


@pytest.mark.parametrize("kind, choice", [
    ("best", [0, 1, 2, 3]),    # all four share the top: that is a tie
    ("best", [1, 1]),          # one pick twice
    ("best", [4]),             # out of range
    ("best", None),
    ("ranking", [0, 1, 2]),    # must rank all four
    ("ranking", [0, 0, 1, 2]),
    ("favourite", [0]),        # unknown kind
])
def test_malformed_labels_are_refused_and_nothing_is_written(store, kind, choice):
    prompt_id, ids = shown(store, "Careful.")
    with pytest.raises(UserError):
        record_label(store, prompt_id, ids, kind, choice)
    assert store.comparisons() == [] and store.pairs() == []


def test_pairs_for_label_needs_no_store():
    assert pairs_for_label("best", [10, 11, 12], [2]) == [(12, 10), (12, 11)]
    assert pairs_for_label("ranking", [10, 11, 12], [1, 2, 0]) == [(11, 12), (11, 10), (12, 10)]
    assert pairs_for_label("skip", [10, 11, 12], None) == []


def test_stats_give_the_labeling_progress(store):
    """The header line's numbers: prompts labeled and remaining, pairs recorded."""
    labeled, ids = shown(store, "Labeled.")
    shown(store, "Waiting.")
    record_label(store, labeled, ids, "best", [0])
    stats = store.stats()
    assert stats["prompts"] == 2 and stats["prompts_labeled"] == 1
    assert stats["prompts"] - stats["prompts_labeled"] == len(store.unlabeled_prompt_ids()) == 1
    assert stats["pairs_labeled"] == 3 and stats["comparisons_by_kind"] == {"best": 1}
