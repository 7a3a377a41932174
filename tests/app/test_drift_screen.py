"""The drift view: reference and policy side by side, blind labels that reach the
store, the over-optimization warning, and a failed label reported, not lost."""

from __future__ import annotations

import sqlite3

import torch
from conftest import FakeSampler, add_completion, drift_label, make_app, wait_for

import rlhf.drift
from rlhf.drift import BlindPair, win_counts
from rlhf.sampling import SamplingParams
from workbench.screens.drift import DriftScreen


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
