"""Policy drift: per-token log-ratios, blind pairs that the store can unblind, and
win-rates that match the labels."""

from __future__ import annotations

import random

import pytest
import torch

from rlhf.drift import (VersionDrift, answer_pair, drift_table, label_blind_pair, load_drift_version,
                        over_optimization, probe_prompts, store_blind_pair, win_counts)
from rlhf.errors import UserError
from rlhf.preferences import record_label
from rlhf.sampling import SamplingParams


def _completion(store, prompt_id, version, text):
    return store.add_completions(prompt_id, [{"text": text, "n_tokens": 1, "finish_reason": "eos",
                                              "policy_version": version}])[0]


def _drift_label(store, versions_shown, kind, choice=None, prompt="p"):
    prompt_id = store.add_prompt(prompt)
    ids = [_completion(store, prompt_id, v, f"answer of v{v}") for v in versions_shown]
    record_label(store, prompt_id, ids, kind, choice, purpose="drift")


def test_win_counts_match_the_labels(store):
    # version 1: wins twice (shown first once, second once), loses once, one tie
    _drift_label(store, [1, 0], "best", [0])
    _drift_label(store, [0, 1], "best", [1])
    _drift_label(store, [0, 1], "best", [0])
    _drift_label(store, [1, 0], "tie")
    _drift_label(store, [1, 0], "skip")          # counts nothing
    # version 2: one loss, one "both bad" (a tie)
    _drift_label(store, [0, 2], "best", [0])
    _drift_label(store, [2, 0], "all_bad")
    # a preference label between the same kind of completions is not a drift label
    prompt_id = store.add_prompt("q")
    ids = [_completion(store, prompt_id, 1, "x"), _completion(store, prompt_id, 0, "y")]
    record_label(store, prompt_id, ids, "best", [0])

    counts = win_counts(store)
    assert (counts[1].wins, counts[1].losses, counts[1].ties) == (2, 1, 1)
    assert counts[1].win_rate == pytest.approx((2 + 0.5) / 4)   # a tie counts half
    assert (counts[2].wins, counts[2].losses, counts[2].ties) == (0, 1, 1)
    assert counts[2].win_rate == pytest.approx(0.25)
    assert 0 not in counts


def test_drift_table_puts_each_versions_rollout_score_beside_its_labels(store, tmp_path):
    store.add_checkpoint("policy", tmp_path, parent_version=0, meta={"rollout_score": 0.1, "kl": 0.0})
    store.add_checkpoint("policy", tmp_path, parent_version=1, meta={"rollout_score": 0.5, "kl": 2.0})
    store.add_checkpoint("policy", tmp_path, parent_version=2, meta={"rollout_score": 0.9, "kl": 5.0})
    _drift_label(store, [1, 0], "best", [0])
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

    stack = load_stack(ModelOptions(source=tiny_dir, quantize=False, device="cpu"))
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
    counts = win_counts(store)[trained_version]
    assert (counts.wins, counts.losses, counts.ties) == (1, 0, 1)


def test_version_zero_is_not_a_drift_target(tiny_stack, store):
    with pytest.raises(UserError, match="reference itself"):
        load_drift_version(tiny_stack, store, 0)


# --- the drift screen -----------------------------------------------------------------


async def test_drift_screen_side_by_side_blind_labels_and_warning(store, tiny_stack, tmp_path):
    from conftest import FakeSampler, make_app, wait_for

    from workbench.screens.drift import DriftScreen

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tiny_stack.adapter_parameters("policy"):
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    tiny_stack.save_adapter("policy", tmp_path / "v1")
    tiny_stack.reset_policy()
    # v1 trained from the base (score 0.2), v2 from v1 (v1's rollouts scored 0.9), v3 from v2 (1.5)
    store.add_checkpoint("policy", tmp_path / "v1", parent_version=0, meta={"rollout_score": 0.2, "kl": 0.0})
    store.add_checkpoint("policy", tmp_path / "v1", parent_version=1, meta={"rollout_score": 0.9, "kl": 3.0})
    store.add_checkpoint("policy", tmp_path / "v1", parent_version=2, meta={"rollout_score": 1.5, "kl": 9.0})
    for shown, kind, choice in [([1, 0], "best", [0])] * 3 + [([0, 2], "best", [0])] * 3:
        _drift_label(store, shown, kind, choice)  # humans: v1 wins 3/3, v2 loses 3/3

    app = make_app(store, stack=tiny_stack, sampler=FakeSampler(),
                   drift_params=SamplingParams(temperature=0.7, top_p=1.0, max_new_tokens=5))
    async with app.run_test(size=(150, 50)) as pilot:
        await pilot.press("f4")
        await wait_for(pilot, lambda: isinstance(app.screen, DriftScreen))
        screen: DriftScreen = app.screen
        await wait_for(pilot, lambda: screen.versions == [1, 2, 3], 10)
        warning = str(screen.query_one("#drift-warning").render())
        assert "over-optimization" in warning and "(v1)" in warning and "(v2)" in warning

        screen.query_one("#drift-version").value = 1
        await wait_for(pilot, lambda: screen.version == 1)
        await pilot.press("n")
        await wait_for(pilot, lambda: screen.pair is not None and not screen.busy, 30)
        right = screen.query_one("#drift-right")
        assert "policy v1" in str(right.border_title) and "KL" in str(right.border_title)
        assert "reference (v0)" in str(screen.query_one("#drift-left").border_title)
        assert tiny_stack.policy_version == 0  # the app's sampling policy was not touched

        await pilot.press("b")
        await pilot.press("n")
        await wait_for(pilot, lambda: screen.blind_pair is not None and not screen.busy, 30)
        assert {str(screen.query_one("#drift-left").border_title),
                str(screen.query_one("#drift-right").border_title)} == {"A", "B"}
        blind = screen.blind_pair
        policy_pos = [a.policy_version for a in blind.answers].index(1)
        await pilot.press("1" if policy_pos == 0 else "2")
        await wait_for(pilot, lambda: win_counts(store)[1].wins == 4, 10)
        last = store.comparisons(purpose="drift")[-1]
        assert last.completion_ids == blind.completion_ids and last.labeler == "tester"


def test_cli_winrate_json_matches_the_labels(store, db_path, capsys):
    import json

    from rlhf.cli import main

    store.add_checkpoint("policy", db_path.parent, parent_version=0, meta={"rollout_score": 0.3, "kl": 0.0})
    _drift_label(store, [1, 0], "best", [0])
    _drift_label(store, [0, 1], "tie")
    assert main(["--db", str(db_path), "drift", "winrate", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    v1 = next(v for v in out["versions"] if v["version"] == 1)
    assert (v1["wins"], v1["losses"], v1["ties"], v1["win_rate"]) == (1, 0, 1, 0.75)
    assert next(v for v in out["versions"] if v["version"] == 0)["reward"] == 0.3
    assert out["ties"] == "count half a win"


async def test_a_blind_label_that_fails_is_reported_and_can_be_given_again(store, monkeypatch):
    import sqlite3

    import rlhf.drift
    from conftest import make_app, wait_for

    from rlhf.drift import BlindPair
    from workbench.screens.drift import DriftScreen

    prompt_id = store.add_prompt("probe?")
    ids = [_completion(store, prompt_id, v, f"answer of v{v}") for v in (0, 1)]
    blind = BlindPair(prompt_id=prompt_id, prompt="probe?", completion_ids=ids, answers=[])
    app = make_app(store)
    notes: list[str] = []
    async with app.run_test(size=(150, 50)) as pilot:
        await pilot.press("f4")
        await wait_for(pilot, lambda: isinstance(app.screen, DriftScreen))
        screen: DriftScreen = app.screen
        real_notify = app.notify
        monkeypatch.setattr(app, "notify", lambda message, **kw: (notes.append(message), real_notify(message, **kw)))

        def locked(*args, **kwargs):
            raise sqlite3.OperationalError("database is locked")

        monkeypatch.setattr(rlhf.drift, "label_blind_pair", locked)
        screen.blind, screen.blind_pair = True, blind  # as if a probe had been answered blind
        await pilot.press("1")
        await wait_for(pilot, lambda: any("OperationalError: database is locked" in n for n in notes))
        await wait_for(pilot, lambda: screen.blind_pair is blind)
        assert store.comparisons(purpose="drift") == [] and app.is_running
