"""Which comparison is labeled next: as added, at random, or where the reward ensemble is least sure."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.errors import UserError
from rlhf.label_order import interleave, ordered, pick_uncertainty, set_uncertainties
from rlhf.preferences import label_by_rule
from rlhf.reward_scoring import RewardScorer
from rlhf.rules import parse_rule


def test_uncertainty_is_how_unsure_the_reward_model_is_of_the_pick():
    clear = torch.tensor([[4.0, 4.0, 4.0], [0.0, 0.0, 0.0]])        # K = 2 answers, 3 heads: the first stands out
    alike = torch.zeros(4, 3)                                       # four answers scored alike
    heads_cancel = torch.tensor([[20.0, 0.0], [0.0, 20.0]])         # the heads' mean: alike
    p = 1 / (1 + math.exp(-4))                                      # softmax(4, 0): 0.982 / 0.018
    assert pick_uncertainty(clear) == pytest.approx(-p * math.log(p) - (1 - p) * math.log(1 - p), abs=1e-6)
    assert pick_uncertainty(alike) == pytest.approx(math.log(4), abs=1e-6)
    assert pick_uncertainty(heads_cancel) == pytest.approx(math.log(2), abs=1e-6)
    assert pick_uncertainty(clear) < pick_uncertainty(torch.tensor([[1.0], [0.0]])) < math.log(2)


def test_orders():
    items = ["a", "b", "c", "d", "e", "f"]
    doubt = [0.1, 0.5, 0.0, 0.4, 0.9, 0.2]
    assert ordered(items, "added") == [0, 1, 2, 3, 4, 5]
    shuffled = ordered(items, "random", seed=1)
    assert sorted(shuffled) == [0, 1, 2, 3, 4, 5] and shuffled == ordered(items, "random", seed=1)
    unsure = ordered(items, "uncertain", uncertainty=doubt, seed=1)
    assert sorted(unsure) == [0, 1, 2, 3, 4, 5]
    assert unsure[0] == 4                                           # by turns: the least sure first,
    assert unsure[1] == next(i for i in shuffled if i != 4)         # then the random order's next,
    assert unsure[2] == max(set(range(6)) - set(unsure[:2]), key=doubt.__getitem__)  # then the least sure left
    with pytest.raises(UserError, match="needs a reward model"):
        ordered(items, "uncertain")
    with pytest.raises(UserError, match="unknown order 'best'"):
        ordered(items, "best")


def test_interleave_takes_each_index_once():
    assert interleave([3, 2, 1, 0], [3, 1, 0, 2]) == [3, 1, 2, 0]
    assert interleave([0, 1, 2], [0, 1, 2]) == [0, 1, 2]


def test_the_scripted_labeler_labels_the_least_sure_set_then_one_at_random(store, tiny_stack):
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
    most = max(range(6), key=uncertainty.__getitem__)
    by_chance = next(i for i in ordered(pending, "random", seed=5) if i != most)

    kinds = label_by_rule(store, parse_rule("longer"), k=4, limit=2, order="uncertain", scorer=scorer, seed=5)
    assert sum(kinds.values()) == 2
    first, second = sorted(store.comparisons(), key=lambda c: c.id)
    assert (first.prompt_id, second.prompt_id) == (pending[most][0], pending[by_chance][0])
    assert len(store.pending_sets(4)) == 4                          # the rest still wait
