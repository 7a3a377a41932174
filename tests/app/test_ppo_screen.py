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


async def test_q_queues_an_iterations_rollouts_and_the_label_screen_shows_them(store, tiny_stack, tmp_path):
    """Both prompts are labeled already; q on iteration 2 (sampled by v1, one answer a prompt) samples
    one more answer of v1 for each, switches labeling to v1, and the Label screen offers those sets."""
    import torch

    from rlhf.preferences import record_label
    from rlhf.sampling import SamplingParams
    from workbench.app import WorkbenchApp
    from workbench.screens.label import LabelScreen

    prompts = ["Say hi.", "Count to three."]
    store.add_prompts(prompts)
    for prompt in store.prompts():
        ids = store.add_completions(prompt.id, [{"text": t, "n_tokens": 1, "finish_reason": "eos",
                                                 "policy_version": 0} for t in ("a", "b")])
        record_label(store, prompt.id, ids, "best", [0], labeler="tester")
    with torch.no_grad():
        for p in tiny_stack.adapter_parameters("policy"):
            p.add_(0.01)
    tiny_stack.save_adapter("policy", tmp_path / "v1")
    tiny_stack.reset_policy()
    job = store.create_job("ppo", {})
    store.add_checkpoint("policy", tmp_path / "v1", job_id=job, parent_version=0, meta={
        "job_id": job, "iteration": 1, "config": {"temperature": 0.7, "top_p": 1.0, "max_new_tokens": 4}})
    store.update_job(job, status="done", step=2)
    store.add_rollouts(job, 2, 1, [{"prompt": p, "completion": f"rollout of {p}", "token_ids": [42, 2],
                                    "score": 0.5, "kl": 0.1, "n_tokens": 2, "finish_reason": "eos"} for p in prompts])

    app = WorkbenchApp(store, k=2, labeler="tester", stack=tiny_stack, policy_version=0,
                       sampling_params=SamplingParams(max_new_tokens=4))
    async with app.run_test(size=(150, 50)) as pilot:
        await pilot.press("f3")
        await wait_for(pilot, lambda: isinstance(app.screen, PPOScreen))
        screen: PPOScreen = app.screen
        await wait_for(pilot, lambda: screen.iteration == 2 and screen.job is not None)
        await pilot.press("q")
        await wait_for(pilot, lambda: app.policy_version == 1, 60)
        for prompt in store.prompts():
            queued = store.completions_for_prompt(prompt.id, 1)
            assert len(queued) == 2 and queued[0].text == f"rollout of {prompt.text}"
        assert tiny_stack.policy_version == 1
        await pilot.press("f1")
        await wait_for(pilot, lambda: isinstance(app.screen, LabelScreen))
        label = app.screen
        await wait_for(pilot, lambda: len(label.shown) == 2 and {c.policy_version for c in label.shown} == {1}, 30)
        assert any(c.text.startswith("rollout of") for c in label.shown)
        assert label.deck.remaining_count == 2  # both labeled prompts wait again, for v1's answers
        first = label.shown_prompt_id
        await pilot.press("1")
        await wait_for(pilot, lambda: len(store.comparisons()) == 3)
        assert {c.policy_version for c in store.completions(store.comparisons()[-1].completion_ids)} == {1}
        # The label leads on to the other queued set, though its prompt was labeled before.
        await wait_for(pilot, lambda: label.shown_prompt_id not in (None, first) and len(label.shown) == 2
                       and any(c.text.startswith("rollout of") for c in label.shown), 30)
        await pilot.press("1")
        await wait_for(pilot, lambda: len(store.comparisons()) == 4)
        assert label.deck.remaining_count == 0
