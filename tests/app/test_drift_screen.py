"""The drift view: reference and policy side by side, blind labels that reach the
store, the over-optimization warning, and a failed label reported, not lost."""

from __future__ import annotations

import math
import sqlite3

import pytest
import torch
from conftest import FakeSampler, add_completion, drift_label, make_app, wait_for

import rlhf.drift
from rlhf.drift import BlindPair, Contender, win_counts
from rlhf.sampling import SamplingParams
from workbench.screens.drift import DriftScreen, chart_groups


async def test_drift_screen_side_by_side_blind_labels_and_warning(store, tiny_stack, tmp_path):
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
        drift_label(store, shown, kind, choice)  # humans: v1 wins 3/3, v2 loses 3/3

    app = make_app(store, stack=tiny_stack, sampler=FakeSampler(),
                   drift_params=SamplingParams(temperature=0.7, top_p=1.0, max_new_tokens=5))
    async with app.run_test(size=(150, 50)) as pilot:
        await pilot.press("f4")
        await wait_for(pilot, lambda: isinstance(app.screen, DriftScreen))
        screen: DriftScreen = app.screen
        await wait_for(pilot, lambda: screen.targets == [Contender(1), Contender(2), Contender(3)], 10)
        warning = str(screen.query_one("#drift-warning").render())
        assert "over-optimization" in warning and "(v1)" in warning and "(v2)" in warning

        screen.query_one("#drift-version").value = Contender(1)
        await wait_for(pilot, lambda: screen.target == Contender(1))
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
        await wait_for(pilot, lambda: win_counts(store)[Contender(1)].wins == 4, 10)
        last = store.comparisons(purpose="drift")[-1]
        assert last.completion_ids == blind.completion_ids and last.labeler == "tester"


async def test_a_blind_label_that_fails_is_reported_and_can_be_given_again(store, monkeypatch):
    prompt_id = store.add_prompt("probe?")
    ids = [add_completion(store, prompt_id, v, f"answer of v{v}") for v in (0, 1)]
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


async def test_best_of_n_answers_blind_and_every_contender_is_on_the_chart(store, tiny_stack, tmp_path):
    """With a reward model, best-of-4 and best-of-16 of the reference answer beside the versions; a
    blind label of best-of-4 lands on its own point; the chart draws what the labels say, and the
    highlighted row is named with its method and settings."""
    tiny_stack.ensure_adapter("reward")
    tiny_stack.save_adapter("reward", tmp_path / "r1", meta={})
    store.add_checkpoint("reward", tmp_path / "r1", meta={"readout": {"layer": 1, "pool": "mean"}})
    tiny_stack.save_adapter("policy", tmp_path / "v1")
    store.add_checkpoint("policy", tmp_path / "v1", parent_version=0,
                         meta={"job_id": 1, "iteration": 1, "method": "dpo", "kl": 1.2, "config": {"beta": 0.1}})
    for shown, kind, choice in [([1, 0], "best", [0])] * 2 + [([0, 1], "best", [0])]:
        drift_label(store, shown, kind, choice)  # v1: 2 wins of 3

    app = make_app(store, stack=tiny_stack, sampler=FakeSampler(),
                   drift_params=SamplingParams(temperature=0.7, top_p=1.0, max_new_tokens=5))
    async with app.run_test(size=(150, 50)) as pilot:
        await pilot.press("f4")
        await wait_for(pilot, lambda: isinstance(app.screen, DriftScreen))
        screen: DriftScreen = app.screen
        await wait_for(pilot, lambda: Contender(0, 4, 1) in screen.targets, 10)
        assert screen.targets == [Contender(1), Contender(0, 4, 1), Contender(0, 16, 1)]
        groups = chart_groups(screen.rows, "win_rate")
        assert [(r.name, r.kl, r.win_rate) for r in groups["dpo"]] == [("v1", 1.2, 2 / 3)]
        assert "v1: dpo · β 0.1, job 1 epoch 1 · KL 1.20 nats on answers sampled after its epoch" in str(
            screen.query_one("#drift-selected").render())

        screen.query_one("#drift-version").value = Contender(0, 4, 1)
        await pilot.press("b")
        await pilot.press("n")
        await wait_for(pilot, lambda: screen.blind_pair is not None and not screen.busy, 30)
        best_at = [a.best_of for a in screen.blind_pair.answers].index(4)
        await pilot.press("1" if best_at == 0 else "2")
        await wait_for(pilot, lambda: Contender(0, 4, 1) in win_counts(store), 10)
        await wait_for(pilot, lambda: "best-of-n" in chart_groups(screen.rows, "win_rate"), 10)
        [point] = chart_groups(screen.rows, "win_rate")["best-of-n"]
        assert (point.name, point.win_rate, point.labels) == ("best-of-4 (reward v1)", 1.0, 1)
        assert point.kl == pytest.approx(math.log(4) - 3 / 4)
        table = screen.query_one("#drift-table")
        assert table.row_count == 2  # v1 and best-of-4: what has a label or a version
