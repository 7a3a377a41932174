"""The reward model in the app: the Train screen drives a real job (tiny model),
the labeling screen shows scores and agreement, the Disagreements view lists
the pairs the reward model gets wrong, worst first."""

from __future__ import annotations

from conftest import FakeSampler, label_screen, make_app, synthetic_pairs, wait_for

from rlhf.preferences import record_label
from workbench.screens.disagreements import DisagreementsScreen
from workbench.screens.train import TrainScreen
from workbench.widgets.completion_card import CompletionCard
from workbench.widgets.status_line import StatusLine

TINY_JOB = {"lr": 2e-3, "batch_size": 8, "accum": 1, "eval_fraction": 0.25, "eval_every": 2}


async def test_train_screen_cancels_then_trains_with_live_plots(store, tiny_stack):
    synthetic_pairs(store, 24)
    reward_job = {**TINY_JOB, "steps": 100000}  # read by the screen each time a job starts
    app = make_app(store, stack=tiny_stack, sampler=FakeSampler(), job_defaults={"reward": {"reward": reward_job}})
    async with app.run_test(size=(140, 40)) as pilot:
        await pilot.press("f2")
        await wait_for(pilot, lambda: isinstance(app.screen, TrainScreen))
        screen: TrainScreen = app.screen
        assert "No reward model trained yet" in str(screen.query_one("#train-status").render())

        await pilot.press("s")
        await wait_for(pilot, lambda: screen.job is not None and screen.job.step >= 2, 90)
        assert screen.job.config["model"]["source"] == tiny_stack.model_dir
        await pilot.press("c")
        await wait_for(pilot, lambda: screen.job.status == "cancelled", 30)
        assert "cancelled" in str(screen.query_one("#train-status").render())

        reward_job.clear()
        reward_job.update({**TINY_JOB, "epochs": 2})
        await pilot.press("s")
        await wait_for(pilot, lambda: screen.job.status == "done" and store.checkpoint("reward"), 120)
        await wait_for(pilot, lambda: "reward v1" in str(screen.query_one("#train-status").render()), 10)
        status = str(screen.query_one("#train-status").render())
        assert "out-of-bag accuracy" in status and "95% CI" in status and "score~length r" in status
        total = screen.job.total_steps
        assert [s for s, _ in screen.series["loss"]] == list(range(1, total + 1))
        assert screen.series["eval/accuracy"]
        assert screen.query_one("#train-progress").progress == total
        # The event loop stayed free: switching screens works while nothing blocks.
        await pilot.press("f1")
        await wait_for(pilot, lambda: not isinstance(app.screen, TrainScreen))


def seed_labels(store):
    """Labeled comparisons, each prompt labeled twice in opposite ways: the reward
    model must disagree with one of the two labels."""
    for i in range(3):
        pid = store.add_prompt(f"Prompt {i}?")
        cids = store.add_completions(pid, [
            {"text": f"answer {j} to {i}", "token_ids": [100 + j + 10 * i, 2], "n_tokens": 2,
             "finish_reason": "eos", "policy_version": 0} for j in range(2)])
        record_label(store, pid, cids, "best", [0], labeler="tester")
        record_label(store, pid, cids, "best", [1], labeler="tester")


def save_reward_version(store, stack, db_path):
    stack.ensure_adapter("reward")
    path = db_path.parent / "reward-v1"
    stack.save_adapter("reward", path, meta={"gain": 2.0, "bias": 0.5})
    store.add_checkpoint("reward", path, meta={"gain": 2.0, "bias": 0.5})


async def test_label_screen_scores_agreement_and_disagreements(store, tiny_stack, db_path):
    seed_labels(store)
    save_reward_version(store, tiny_stack, db_path)
    app = make_app(store, stack=tiny_stack, sampler=FakeSampler())
    async with app.run_test(size=(140, 40)) as pilot:
        screen = label_screen(app)
        await wait_for(pilot, lambda: len(screen.shown) == app.k, 10)
        await wait_for(pilot, lambda: all(c.score is not None for c in screen.query(CompletionCard)
                                          if c.completion is not None), 20)
        await wait_for(pilot, lambda: screen.query_one(StatusLine).agreement is not None, 20)
        assert "of 6 pairs" in screen.query_one(StatusLine).agreement
        scores = [c.score for c in screen.query(CompletionCard) if c.completion is not None]
        expected = app.model_host.scorer.score_completions(store.prompt(screen.shown_prompt_id).text,
                                                              screen.shown)
        assert scores == expected
        assert app.model_host.scorer.gain == 2.0

        await pilot.press("f2")
        await wait_for(pilot, lambda: isinstance(app.screen, TrainScreen))
        await pilot.press("d")
        await wait_for(pilot, lambda: isinstance(app.screen, DisagreementsScreen))
        view: DisagreementsScreen = app.screen
        await wait_for(pilot, lambda: view.n_pairs == 6, 20)
        assert len(view.rows) >= 3  # one of each prompt's two opposite labels at least
        margins = [r.margin for r in view.rows]
        assert margins == sorted(margins) and all(m <= 0 for m in margins)
        assert view.query_one("#disagree-table").row_count == len(view.rows)
        assert "Labeler chose" in str(view.query_one("#disagree-text").render())
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, TrainScreen))


async def test_completions_shown_before_the_model_loads_are_scored_once_it_has(store, tiny_stack, tiny_dir,
                                                                               db_path):
    from rlhf.model_options import ModelOptions
    from workbench.app import WorkbenchApp

    seed_labels(store)
    save_reward_version(store, tiny_stack, db_path)
    pid = store.add_prompt("An unlabeled prompt?")
    store.add_completions(pid, [{"text": t, "token_ids": [300 + j, 2], "n_tokens": 2, "finish_reason": "eos",
                                 "policy_version": 0} for j, t in enumerate(("yes", "no"))])
    app = WorkbenchApp(store, k=2, labeler="tester", model=ModelOptions(source=tiny_dir, quantize=False,
                                                                         device="cpu"))
    async with app.run_test(size=(140, 40)) as pilot:
        screen = label_screen(app)
        await wait_for(pilot, lambda: screen.shown_prompt_id == pid, 10)
        await wait_for(pilot, lambda: app.model_state == "ready", 60)
        await wait_for(pilot, lambda: all(c.score is not None for c in screen.query(CompletionCard)
                                          if c.completion is not None), 20)
        await wait_for(pilot, lambda: screen.query_one(StatusLine).agreement is not None, 20)
        assert screen.query_one(StatusLine).agreement.endswith("of 6 pairs (v1)")


def test_status_line_says_why_a_job_failed_and_what_a_finished_one_gave():
    from rlhf.rows import Checkpoint, Job
    from workbench.screens.train import Snapshot

    screen = TrainScreen()
    failed = Job(id=4, kind="reward", status="failed", step=7, total_steps=20,
                 error="process 123 ended without finishing (crashed, killed or out of memory); last step 7")
    assert screen.status_text(Snapshot(job=failed)) == f"job 4 failed: {failed.error}"
    done = Job(id=5, kind="reward", status="done", step=20, total_steps=20)
    checkpoint = Checkpoint(kind="reward", version=2, path="/r", job_id=5,
                            meta={"eval_accuracy": 0.75, "eval_pairs": 40, "gain": 1.5, "bias": -0.25, "epochs": 312.0,
                                  "length_corr": 0.62, "eval_elements": 14, "labels_prefer_longer": 0.8,
                                  "length_pairs": 30})
    text = screen.status_text(Snapshot(job=done, checkpoint=checkpoint, pairs_labeled=3))
    # 40 pairs from 14 best-of-K comparisons: the interval is as wide as 14 draws make it.
    assert text.startswith("reward v2 (job 5): held-out accuracy 0.75 on 40 pairs from 14 comparisons "
                           "(95% CI 0.49-0.90), 312 epochs")
    assert "score~length r +0.62, labels chose the longer in 80% of 30 pairs" in text
    running = Job(id=6, kind="reward", status="running", step=20, total_steps=20)
    assert "scoring the labeled completions" in screen.status_text(Snapshot(job=running))
