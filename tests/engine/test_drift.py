"""Policy drift: per-token log-ratios, blind pairs that the store can unblind, and
win-rates that match the labels."""

from __future__ import annotations

import math
import random

import pytest
import torch

from conftest import add_completion, drift_label

from rlhf.drift import (Contender, VersionDrift, answer_pair, drift_table, label_blind_pair, load_drift_version,
                        over_optimization, probe_prompts, store_blind_pair, win_counts)
from rlhf.errors import UserError
from rlhf.preferences import record_label
from rlhf.sampling import SamplingParams


def test_win_counts_match_the_labels(store):
    # version 1: wins twice (shown first once, second once), loses once, one tie
    drift_label(store, [1, 0], "best", [0])
    drift_label(store, [0, 1], "best", [1])
    drift_label(store, [0, 1], "best", [0])
    drift_label(store, [1, 0], "tie")
    drift_label(store, [1, 0], "skip")          # counts nothing
    # version 2: one loss, one "both bad" (a tie)
    drift_label(store, [0, 2], "best", [0])
    drift_label(store, [2, 0], "all_bad")
    # a preference label between the same kind of completions is not a drift label
    prompt_id = store.add_prompt("q")
    ids = [add_completion(store, prompt_id, 1, "x"), add_completion(store, prompt_id, 0, "y")]
    record_label(store, prompt_id, ids, "best", [0])

    counts = win_counts(store)
    assert (counts[Contender(1)].wins, counts[Contender(1)].losses, counts[Contender(1)].ties) == (2, 1, 1)
    assert counts[Contender(1)].win_rate == pytest.approx((2 + 0.5) / 4)   # a tie counts half
    assert (counts[Contender(2)].wins, counts[Contender(2)].losses, counts[Contender(2)].ties) == (0, 1, 1)
    assert counts[Contender(2)].win_rate == pytest.approx(0.25)
    assert Contender(0) not in counts


def test_drift_table_puts_each_versions_rollout_score_beside_its_labels(store, tmp_path):
    store.add_checkpoint("policy", tmp_path, parent_version=0, meta={"rollout_score": 0.1, "kl": 0.0})
    store.add_checkpoint("policy", tmp_path, parent_version=1, meta={"rollout_score": 0.5, "kl": 2.0})
    store.add_checkpoint("policy", tmp_path, parent_version=2, meta={"rollout_score": 0.9, "kl": 5.0})
    drift_label(store, [1, 0], "best", [0])
    rows = {r.version: r for r in drift_table(store)}
    assert sorted(rows) == [0, 1, 2, 3]
    # the score in v2's meta came from rollouts of its parent, v1
    assert (rows[0].reward, rows[1].reward, rows[2].reward, rows[3].reward) == (0.1, 0.5, 0.9, None)
    assert rows[1].kl == 2.0 and rows[1].wins == 1


def test_over_optimization_is_called_out():
    rows = [VersionDrift(0, reward=0.0), VersionDrift(1, wins=7, losses=3, reward=0.5),
            VersionDrift(2, wins=6, losses=4, reward=0.8), VersionDrift(3, wins=2, losses=8, reward=1.6)]
    warnings = over_optimization(rows)
    assert any("reward rose from 0.50 (v1) to 1.60 (v3)" in w and "70% to 20%" in w for w in warnings)
    assert any(w.startswith("v3 loses to the reference") for w in warnings)
    assert not any("(v2)" in w and "rose" in w for w in warnings)
    healthy = [VersionDrift(0, reward=0.0), VersionDrift(1, wins=6, losses=4, reward=0.5),
               VersionDrift(2, wins=8, losses=2, reward=0.9)]
    assert over_optimization(healthy) == []
    assert over_optimization([VersionDrift(1, wins=0, losses=2, reward=3.0)]) == []  # too few labels


def test_probe_prompts_are_bundled():
    prompts = probe_prompts()
    assert len(prompts) >= 5 and all(p.strip() for p in prompts)


@pytest.fixture
def trained_version(tiny_stack, store, tmp_path):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tiny_stack.adapter_parameters("policy"):
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    tiny_stack.save_adapter("policy", tmp_path / "v1")
    version = store.add_checkpoint("policy", tmp_path / "v1", parent_version=0)
    return version


def test_answer_pair_gives_every_token_a_log_ratio(tiny_dir, store, trained_version):
    from rlhf.model_options import ModelOptions
    from rlhf.models import load_stack

    stack = load_stack(ModelOptions(source=tiny_dir, quantize=False, device="cpu", dtype="float32"))
    load_drift_version(stack, store, trained_version)
    torch.manual_seed(0)
    params = SamplingParams(temperature=0.7, top_p=1.0, max_new_tokens=6)
    pair = answer_pair(stack, "What is the capital of France?", params)
    for answer, version in ((pair.reference, 0), (pair.policy, trained_version)):
        assert answer.policy_version == version
        assert len(answer.pieces) == len(answer.log_ratios) == len(answer.token_ids)
        assert "".join(answer.pieces).strip() == answer.text
    # A trained adapter differs from the base: the log-ratios are not all zero.
    assert max(abs(x) for x in pair.policy.log_ratios) > 1e-3
    assert pair.kl == pytest.approx(sum(pair.policy.log_ratios))

    # Blind: random order, but the store knows which answer came from which version.
    blind = store_blind_pair(store, pair, params, random.Random(3))
    shown = [c.policy_version for c in store.completions(blind.completion_ids)]
    assert sorted(shown) == [0, trained_version]
    policy_pos = shown.index(trained_version)
    label_blind_pair(store, blind, policy_pos, labeler="me")
    label_blind_pair(store, blind, None)
    counts = win_counts(store)[Contender(trained_version)]
    assert (counts.wins, counts.losses, counts.ties) == (1, 0, 1)


def test_version_zero_is_not_a_drift_target(tiny_stack, store):
    with pytest.raises(UserError, match="reference itself"):
        load_drift_version(tiny_stack, store, 0)


def test_cli_winrate_json_matches_the_labels(store, db_path, capsys):
    import json

    from rlhf.cli import main

    store.add_checkpoint("policy", db_path.parent, parent_version=0, meta={"rollout_score": 0.3, "kl": 0.0})
    drift_label(store, [1, 0], "best", [0])
    drift_label(store, [0, 1], "tie")
    assert main(["--db", str(db_path), "drift", "winrate", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    v1 = next(v for v in out["versions"] if v["version"] == 1)
    assert (v1["wins"], v1["losses"], v1["ties"], v1["win_rate"]) == (1, 0, 1, 0.75)
    assert next(v for v in out["versions"] if v["version"] == 0)["reward"] == 0.3
    assert out["ties"] == "count half a win"




class PlantedScorer:
    """A reward model that likes answers by their planted score: here, the number of tokens."""

    version = 7

    def __init__(self):
        self.seen = []

    def raw_ids(self, prompt_ids, completion_ids):
        self.seen = [list(c) for c in completion_ids]
        return torch.tensor([float(len(c)) + 0.01 * i for i, c in enumerate(completion_ids)])


def test_best_of_n_answers_with_the_reward_models_top_sample_and_its_bound(tiny_stack, store):
    from rlhf.best_of import best_of_n_kl_bound
    from rlhf.drift import answer_best_of_pair

    scorer = PlantedScorer()
    torch.manual_seed(0)
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=8)
    pair = answer_best_of_pair(tiny_stack, scorer, "Name a colour.", params, 4)
    assert len(scorer.seen) == 4
    top = max(range(4), key=lambda i: len(scorer.seen[i]) + 0.01 * i)
    assert pair.policy.token_ids == scorer.seen[top]
    assert (pair.policy.best_of, pair.policy.reward_version, pair.policy.policy_version) == (4, 7, 0)
    assert pair.reference.best_of is None and set(pair.policy.log_ratios) <= {0.0}
    assert pair.kl == pytest.approx(best_of_n_kl_bound(4)) == pytest.approx(math.log(4) - 3 / 4)
    with pytest.raises(UserError, match="reference itself"):
        answer_best_of_pair(tiny_stack, scorer, "Name a colour.", params, 1)

    # Stored blind and labeled: a contender of its own, beside the versions, at its bound.
    blind = store_blind_pair(store, pair, params, random.Random(0))
    best_at = [c.best_of for c in store.completions(blind.completion_ids)].index(4)
    label_blind_pair(store, blind, best_at)
    label_blind_pair(store, store_blind_pair(store, pair, params, random.Random(1)), None)
    row = win_counts(store)[Contender(0, 4, 7)]
    assert (row.wins, row.losses, row.ties, row.name) == (1, 0, 1, "best-of-4 (reward v7)")
    [bon] = [r for r in drift_table(store) if r.best_of]
    assert bon.method == "best-of-n" and bon.kl == pytest.approx(best_of_n_kl_bound(4)) and bon.win_rate == 0.75


def test_every_version_of_every_method_gets_its_kl_method_and_interval(store, tmp_path):
    ppo = {"algorithm": "ppo", "beta": 0.05, "learning_rate": 1e-4}
    store.add_checkpoint("policy", tmp_path, parent_version=0, job_id=None,
                         meta={"job_id": 2, "iteration": 1, "rollout_score": 0.0, "kl": 0.0, "config": ppo})
    store.add_checkpoint("policy", tmp_path, parent_version=1,
                         meta={"job_id": 2, "iteration": 2, "rollout_score": 0.4, "kl": 1.5, "config": ppo})
    store.add_checkpoint("policy", tmp_path, parent_version=0,
                         meta={"job_id": 3, "iteration": 1, "method": "dpo", "kl": 0.8, "config": {"beta": 0.1}})
    for _ in range(3):
        drift_label(store, [3, 0], "best", [0])
    drift_label(store, [0, 3], "best", [0])
    rows = {r.name: r for r in drift_table(store)}
    assert (rows["v1"].method, rows["v1"].kl, rows["v1"].kl_source) == ("ppo", 1.5, "rollouts sampled from it")
    assert rows["v1"].settings == "β 0.05, lr 0.0001, job 2 iteration 1"
    assert rows["v2"].kl == 1.5 and rows["v2"].kl_source.startswith("the batch it was trained on")
    assert (rows["v3"].method, rows["v3"].kl, rows["v3"].kl_source) == ("dpo", 0.8, "answers sampled after its epoch")
    assert rows["v3"].win_rate == 0.75 and rows["v3"].labels == 4
    low, high = rows["v3"].interval()
    assert low < 0.75 < high and rows["v0"].kl == 0.0 and rows["v0"].interval() is None


def test_a_kl_to_another_reference_is_not_put_beside_kls_to_the_base(store, tmp_path):
    """A second session started from v1 measures its KL to v1: its versions get no point on the chart."""
    store.add_checkpoint("policy", tmp_path, parent_version=0, meta={"rollout_score": 0.0, "kl": 0.0,
                                                                     "reference_version": 0})
    store.add_checkpoint("policy", tmp_path, parent_version=1, meta={"rollout_score": 0.3, "kl": 0.5,
                                                                     "reference_version": 1})
    store.add_checkpoint("policy", tmp_path, parent_version=2, meta={"rollout_score": 0.6, "kl": 1.0,
                                                                     "reference_version": 1})
    rows = {r.name: r for r in drift_table(store)}
    assert rows["v0"].kl == 0.0
    # v1's own rollouts were measured against v1; the batch that trained it, against the base, stands in.
    assert rows["v1"].kl == 0.0 and rows["v1"].kl_source.startswith("the batch it was trained on")
    assert rows["v2"].kl is None and rows["v2"].kl_source == "not to the base: its session measured KL to v1"
    assert rows["v3"].kl is None and rows["v2"].reward == 0.6


def test_pairs_after_the_first_merge_the_sampling_copy_once_each(tiny_dir, store, trained_version, monkeypatch):
    from rlhf.inference_copy import InferenceCopy
    from rlhf.model_options import ModelOptions
    from rlhf.models import load_stack

    stack = load_stack(ModelOptions(source=tiny_dir, quantize=False, device="cpu", dtype="float32"))
    assert stack.fast_sampling
    load_drift_version(stack, store, trained_version)
    merged: list[str | None] = []
    merge = InferenceCopy.merge
    monkeypatch.setattr(InferenceCopy, "merge", lambda copy, adapter: (merged.append(adapter), merge(copy, adapter)))
    params = SamplingParams(temperature=0.7, top_p=1.0, max_new_tokens=4)
    pairs = [answer_pair(stack, "Name a colour.", params) for _ in range(3)]
    assert merged == [None, "drift", None, "drift"]     # the base and the version, then one switch a pair
    assert all(p.reference.policy_version == 0 and p.policy.policy_version == trained_version for p in pairs)
