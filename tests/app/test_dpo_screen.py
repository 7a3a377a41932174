"""The DPO screen drives a real DPO job on the tiny model: live loss, accuracy,
implicit rewards and KL, a policy version per epoch, and what the status says."""

from __future__ import annotations

from conftest import FakeSampler, make_app, synthetic_pairs, wait_for

from rlhf.rows import Checkpoint, Job
from workbench.screens.dpo import DPOScreen, Snapshot

TINY_DPO = {"sources": "all", "batch_size": 8, "kl_prompts": 2, "max_completion_tokens": 16}


async def test_dpo_screen_trains_with_live_plots_and_saves_a_version_per_epoch(store, tiny_stack):
    synthetic_pairs(store, 16)
    app = make_app(store, stack=tiny_stack, sampler=FakeSampler(), job_defaults={"dpo": {"dpo": TINY_DPO}})
    async with app.run_test(size=(140, 40)) as pilot:
        await pilot.press("f5")
        await wait_for(pilot, lambda: isinstance(app.screen, DPOScreen))
        screen: DPOScreen = app.screen
        assert "No DPO run yet" in str(screen.query_one("#dpo-status").render())

        screen.query_one("#dpo-epochs").value = 2
        await pilot.press("s")
        await wait_for(pilot, lambda: screen.job is not None and screen.job.status == "done", 180)
        await wait_for(pilot, lambda: "saved v1-v2" in str(screen.query_one("#dpo-status").render()), 10)
        job = screen.job
        assert job.config["dpo"]["epochs"] == 2 and job.config["model"]["source"] == tiny_stack.model_dir
        assert [c.meta["method"] for c in store.checkpoints("policy")] == ["dpo", "dpo"]
        for name in ("loss", "rewards/accuracies", "rewards/chosen", "rewards/rejected"):
            assert [s for s, _ in screen.series[name]] == list(range(1, job.total_steps + 1)), name
        assert len(screen.series["objective/kl"]) == 2 and len(screen.series["eval/rewards/accuracies"]) == 2
        status = str(screen.query_one("#dpo-status").render())
        assert "held-out accuracy" in status and "KL" in status
        assert screen.query_one("#dpo-progress").progress == job.total_steps
        await pilot.press("f1")
        await wait_for(pilot, lambda: not isinstance(app.screen, DPOScreen))


def test_dpo_status_says_why_a_job_failed_and_what_a_finished_one_saved():
    screen = DPOScreen()
    failed = Job(id=4, kind="dpo", status="failed", step=3, error="no preference pairs for DPO: label some first")
    assert screen.status_text(Snapshot(job=failed)) == f"DPO job 4 failed: {failed.error}"
    done = Job(id=5, kind="dpo", status="done", step=12, total_steps=12)
    versions = [Checkpoint(kind="policy", version=v, path="/p", job_id=5,
                           meta={"eval_accuracy": 0.7, "eval_pairs": 20, "kl": 1.234}) for v in (3, 4)]
    text = screen.status_text(Snapshot(job=done, versions=versions, pairs_labeled=40))
    assert text.startswith("DPO job 5 done at step 12\nsaved v3-v4; at v4: held-out accuracy 0.70 on 20 pairs")
    assert "KL 1.23 nats" in text and "40 labeled pairs" in text
