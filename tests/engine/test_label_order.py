"""Which comparison is labeled next: as added, at random, or the one whose label tells the reward model most."""

from __future__ import annotations

import pytest
import torch

from rlhf.errors import UserError
from rlhf.label_order import design_order, labeled_sets, ordered, set_features
from rlhf.preferences import label_by_rule
from rlhf.reward_scoring import RewardScorer
from rlhf.rules import parse_rule


def pair(direction: torch.Tensor) -> torch.Tensor:
    """A set of two answers whose features differ along ``direction`` alone: a label
    on it tells the reward model about that direction. Where they sit (the same for
    both) is drawn wide, so that every feature varies alike and standardizing the
    features changes little."""
    at = torch.randn(direction.shape[0]) * 5
    return torch.stack([at + direction, at - direction])


def axis(i: int, dim: int = 6) -> torch.Tensor:
    return torch.eye(dim)[i]


def test_the_design_labels_first_the_set_whose_label_tells_about_many_others():
    torch.manual_seed(0)
    crowd = [pair(axis(0)) for _ in range(8)]          # eight sets alike
    loner = pair(axis(1))                              # one set unlike them
    order = design_order([], [loner, *crowd])
    assert order[0] != 0                               # one of the crowd: its label settles eight sets' doubt
    assert order.index(0) < len(crowd)                 # the loner before the crowd is done: theirs is mostly gone
    assert sorted(order) == list(range(9))


def test_a_set_like_those_already_labeled_comes_later():
    torch.manual_seed(1)
    first = [pair(axis(0)) for _ in range(3)]
    second = [pair(axis(1)) for _ in range(3)]
    assert design_order([pair(axis(0)), pair(axis(0))], [*first, *second])[0] in range(3, 6)
    assert design_order([pair(axis(1)), pair(axis(1))], [*first, *second])[0] in range(3)


def test_a_set_whose_answers_read_alike_comes_last_and_sizes_may_differ():
    torch.manual_seed(2)
    alike = torch.ones(3, 6)                           # three answers, one reading: a label teaches nothing
    waiting = [pair(axis(0)), alike, pair(axis(1)), torch.randn(4, 6)]
    order = design_order([], waiting)
    assert sorted(order) == [0, 1, 2, 3] and order[-1] == 1
    assert design_order([], waiting, picks=1)[1:] == [i for i in range(4) if i != order[0]]  # the rest as given


@pytest.mark.parametrize("seed", [0, 1])
def test_each_pick_removes_the_most_summed_variance_recomputed_from_scratch(seed):
    """The design's kept blocks against the posterior worked out afresh at every pick."""
    generator = torch.Generator().manual_seed(seed)
    waiting = [torch.randn(k, 10, generator=generator, dtype=torch.float64)
               * (1 + 2 * torch.rand(1, generator=generator, dtype=torch.float64))  # spreads apart
               for k in (2, 3, 4, 2, 3, 4, 2, 3, 2)]
    labeled = [torch.randn(3, 10, generator=generator, dtype=torch.float64) for _ in range(2)]
    rows = torch.cat([*waiting, *labeled])
    mean, std = rows.mean(0), rows.std(0)

    def information(s: torch.Tensor) -> torch.Tensor:  # the centred, standardized answers over sqrt(K)
        z = (s - mean) / std
        return (z - z.mean(0)) / len(s) ** 0.5

    v = torch.cat([information(s) for s in waiting])
    precision = 0.3 * (v ** 2).sum() / len(waiting) * torch.eye(10, dtype=torch.float64)
    precision += sum(information(s).T @ information(s) for s in labeled)

    def summed_variance(p: torch.Tensor) -> float:
        return float((v @ torch.linalg.solve(p, v.T)).trace())

    expected, left = [], list(range(len(waiting)))
    while left:
        after = {i: summed_variance(precision + information(waiting[i]).T @ information(waiting[i])) for i in left}
        best = min(left, key=after.__getitem__)
        expected.append(best)
        left.remove(best)
        precision = precision + information(waiting[best]).T @ information(waiting[best])
    assert design_order(labeled, waiting, prior=0.3) == expected


def test_nothing_to_tell_apart_keeps_the_queue_as_given():
    alike = [torch.ones(4, 6), torch.full((2, 6), 3.0)]  # every set's answers read the same: no label teaches
    assert design_order([], alike) == [0, 1]
    assert design_order([], []) == []


def test_orders():
    items = ["a", "b", "c", "d", "e", "f"]
    priority = [0.1, 0.5, 0.0, 0.4, 0.9, 0.2]
    assert ordered(items, "added") == [0, 1, 2, 3, 4, 5]
    shuffled = ordered(items, "random", seed=1)
    assert sorted(shuffled) == [0, 1, 2, 3, 4, 5] and shuffled == ordered(items, "random", seed=1)
    assert ordered(items, "uncertain", priority=priority) == [4, 1, 3, 5, 0, 2]
    with pytest.raises(UserError, match="needs the model's features"):
        ordered(items, "uncertain")
    with pytest.raises(UserError, match="unknown order 'best'"):
        ordered(items, "best")


def test_the_scripted_labeler_labels_in_the_design_order_given_its_earlier_labels(store, tiny_stack):
    tiny_stack.ensure_adapter("reward")
    scorer = RewardScorer(tiny_stack)                  # no reward version needed: the design reads features
    words = ["red", "green", "blue apple", "pear", "plum tree", "fig", "kiwi", "lime", "date palm", "nut"]
    for i in range(6):
        pid = store.add_prompt(f"Name a thing, {i}")
        store.add_completions(pid, [{"text": words[(i * 3 + j) % 10], "token_ids": [], "n_tokens": 1,
                                     "finish_reason": "eos", "policy_version": 0} for j in range(4)])
    pending = store.pending_sets(4)
    sets = [(store.prompt(pid).text, shown) for pid, shown in pending]
    features = set_features(scorer, sets)
    first = design_order([], features)[0]
    second = design_order([features[first]], [f for i, f in enumerate(features) if i != first])[0]
    second += second >= first                          # back to an index of all six

    for _ in range(2):                                 # one label a call: the second call knows the first
        kinds = label_by_rule(store, parse_rule("longer"), k=4, limit=1, order="uncertain", scorer=scorer)
        assert sum(kinds.values()) == 1
    labels = sorted(store.comparisons(), key=lambda c: c.id)
    assert [c.prompt_id for c in labels] == [pending[first][0], pending[second][0]]
    assert [text for text, _ in labeled_sets(store)] == [sets[first][0], sets[second][0]]
    assert len(store.pending_sets(4)) == 4                          # the rest still wait
