"""Which comparison is labeled next: as added, at random, or where the reward ensemble is least sure."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.errors import UserError
from rlhf.label_order import ordered, pick_uncertainty, set_uncertainties
from rlhf.preferences import label_by_rule
from rlhf.reward_scoring import RewardScorer
from rlhf.rules import parse_rule


def test_uncertainty_is_the_heads_disagreement_about_the_pick():
    agree = torch.tensor([[4.0, 4.0, 4.0], [0.0, 0.0, 0.0]])        # K = 2 answers, 3 heads: all pick the first
    disagree = torch.tensor([[20.0, 0.0], [0.0, 20.0]])            # each head sure, of a different answer
    toss_up = torch.zeros(4, 3)                                     # every head: no idea (a label would not help)
    assert pick_uncertainty(agree) == pytest.approx(0.0, abs=1e-6)
    assert pick_uncertainty(disagree) == pytest.approx(math.log(2), abs=1e-3)
    assert pick_uncertainty(toss_up) == pytest.approx(0.0, abs=1e-6)
    assert pick_uncertainty(torch.tensor([[3.0], [1.0]])) == pytest.approx(0.0, abs=1e-6)  # one head


def test_orders():
    items = ["a", "b", "c", "d"]
    assert ordered(items, "added") == [0, 1, 2, 3]
    assert ordered(items, "uncertain", uncertainty=[0.1, 0.5, 0.0, 0.5]) == [1, 3, 0, 2]
    shuffled = ordered(items, "random", seed=1)
    assert sorted(shuffled) == [0, 1, 2, 3] and shuffled == ordered(items, "random", seed=1)
    with pytest.raises(UserError, match="needs a reward model"):
        ordered(items, "uncertain")
    with pytest.raises(UserError, match="unknown order 'best'"):
        ordered(items, "best")


def test_the_scripted_labeler_labels_the_sets_the_ensemble_is_least_sure_of_first(store, tiny_stack):
    tiny_stack.ensure_adapter("reward")
    tiny_stack.set_reward_heads(4)                                  # random heads: they disagree, unevenly
    scorer = RewardScorer(tiny_stack)
    words = ["red", "green", "blue apple", "pear", "plum tree", "fig", "kiwi", "lime", "date palm", "nut"]
    for i in range(6):
        pid = store.add_prompt(f"Name a thing, {i}")
        store.add_completions(pid, [{"text": words[(i + j) % 10], "token_ids": [], "n_tokens": 1,
                                     "finish_reason": "eos", "policy_version": 0} for j in range(4)])
    pending = store.pending_sets(4)
    uncertainty = set_uncertainties(scorer, [(store.prompt(pid).text, shown) for pid, shown in pending])
    most = sorted(range(6), key=lambda i: -uncertainty[i])[:2]

    kinds = label_by_rule(store, parse_rule("longer"), k=4, limit=2, order="uncertain", scorer=scorer)
    assert sum(kinds.values()) == 2
    assert {c.prompt_id for c in store.comparisons()} == {pending[i][0] for i in most}
    assert len(store.pending_sets(4)) == 4                          # the rest still wait
