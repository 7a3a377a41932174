"""The PPO screen in front of a real PPO job on the tiny model: start, pause,
resume, stop and continue reach the job, and its plots and rollouts fill."""

from __future__ import annotations

from conftest import FakeSampler, make_app, wait_for
from test_app_snapshots import _finished_ppo_session

from workbench.screens.ppo import PPOScreen


async def test_ppo_screen_starts_pauses_stops_and_continues_a_session(store, tiny_stack):
    """The real job behind the screen: plots fill, the rollouts table shows the
    latest batch, and start / pause / resume / stop / continue reach the job."""
    ppo_job = {"reward": "rule:distinct", "iterations": 200,  # read by the screen each time a session starts
               "ppo": {"batch_size": 4, "mini_batch_size": 2, "epochs": 1, "max_new_tokens": 4}}
    app = make_app(store, stack=tiny_stack, sampler=FakeSampler(), job_defaults={"ppo": ppo_job})
    async with app.run_test(size=(150, 50)) as pilot:
        await pilot.press("f3")
        await wait_for(pilot, lambda: isinstance(app.screen, PPOScreen))
        screen: PPOScreen = app.screen
        await wait_for(pilot, lambda: "No PPO session yet" in str(screen.query_one("#ppo-status").render()))
        await pilot.press("s")
        await wait_for(pilot, lambda: len(screen.series.get("objective/kl", [])) >= 1 and screen.rollouts, 90)
        assert screen.job.config["model"]["source"] == tiny_stack.model_dir
        assert screen.query_one("#ppo-rollouts").row_count == 4
        await pilot.press("p")
        await wait_for(pilot, lambda: screen.job.status == "paused", 60)
        assert "r resumes" in str(screen.query_one("#ppo-status").render())
        step = screen.job.step
        await pilot.press("r")
        await wait_for(pilot, lambda: screen.job.status == "running" and screen.job.step > step, 60)
        await pilot.press("e")
        await wait_for(pilot, lambda: screen.job.status == "cancelled", 60)
        stopped_at = store.checkpoint("policy")
        assert stopped_at is not None

        ppo_job["iterations"] = 1
        await pilot.press("c")
        await wait_for(pilot, lambda: screen.job.id != stopped_at.job_id and screen.job.status == "done",
                        90)
        latest = store.checkpoint("policy")
        assert latest.parent_version == stopped_at.version
        assert latest.meta["reference_version"] == 0
        # every plotted metric arrived, and the event loop stayed free
        for name in ("objective/scores", "objective/kl", "beta", "objective/entropy", "policy/clipfrac",
                     "val/completion_tokens", "val/eos_fraction"):
            assert screen.series[name]
        assert "EOS 0%" in screen.status_text() and "length 4" in screen.status_text()
        await pilot.press("f1")
        await wait_for(pilot, lambda: not isinstance(app.screen, PPOScreen))


async def test_the_rollouts_of_every_iteration_are_browsed_and_sorted(store, tmp_path):
    """A finished session kept iterations 9 and 10: [ shows 9's, o sorts by KL, ]
    goes back to following the latest."""
    _finished_ppo_session(store, tmp_path)
    app = make_app(store, sampler=FakeSampler())
    async with app.run_test(size=(150, 50)) as pilot:
        await pilot.press("f3")
        await wait_for(pilot, lambda: isinstance(app.screen, PPOScreen))
        screen: PPOScreen = app.screen
        table = screen.query_one("#ppo-rollouts")

        def title() -> str:
            return str(screen.query_one("#ppo-rollouts-title").render())

        await wait_for(pilot, lambda: "iteration 10 (the latest)" in title())
        assert table.row_count == 5 and "kept: iterations 9-10" in title()
        scores = [r.score for r in screen.rollouts]
        assert scores == sorted(scores, reverse=True)
        await pilot.press("left_square_bracket")
        await wait_for(pilot, lambda: "iteration 9 ·" in title())
        assert table.row_count == 4 and {r.iteration for r in screen.rollouts} == {9}
        await pilot.press("o")
        await wait_for(pilot, lambda: "highest kl first" in title())
        kls = [r.kl for r in screen.rollouts]
        assert kls == sorted(kls, reverse=True) and {r.iteration for r in screen.rollouts} == {9}
        await pilot.press("left_square_bracket")  # nothing before the first kept
        await pilot.press("right_square_bracket")
        await wait_for(pilot, lambda: "iteration 10 (the latest)" in title())
        assert table.row_count == 5


async def test_a_kl_budget_chosen_on_screen_reaches_the_session_and_its_end_is_told(store, tiny_stack):
    """KL ≤ 10 goes into the session's settings; a session the budget ended says which version
    passed it and which is the last within it, in the status line and the notice."""
    ppo_job = {"reward": "rule:distinct", "iterations": 1,
               "ppo": {"batch_size": 4, "mini_batch_size": 2, "epochs": 1, "max_new_tokens": 4}}
    app = make_app(store, stack=tiny_stack, sampler=FakeSampler(), job_defaults={"ppo": ppo_job})
    async with app.run_test(size=(150, 50)) as pilot:
        await pilot.press("f3")
        await wait_for(pilot, lambda: isinstance(app.screen, PPOScreen))
        screen: PPOScreen = app.screen
        screen.query_one("#ppo-kl-budget").value = 10.0
        await pilot.press("s")
        await wait_for(pilot, lambda: screen.job is not None and screen.job.status == "done", 90)
        assert screen.job.config["ppo"]["kl_budget"] == 10.0
        [v1] = store.checkpoints("policy")
        assert "v1" in screen.status_text() and "budget" not in screen.status_text()  # 10 nats: not reached

        # As the job leaves a session the budget ended: the version that sampled past it, marked.
        store.update_checkpoint_meta("policy", 1, {**v1.meta, "own_kl": 12.5, "over_kl_budget": 10.0})
        screen.poll()
        await wait_for(pilot, lambda: "passed the budget" in screen.status_text())
        assert ("its KL passed the budget of 10 nats at v1 (12.5); v0 is the last version within it"
                in screen.status_text())
