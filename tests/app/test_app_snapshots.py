"""Whole-screen pictures of every screen and dialog of the workbench (pytest-textual-snapshot),
one class per feature: labeling, its dialogs, help, Train, disagreements, PPO, drift, DPO.

No model is loaded: completions come from ``FakeSampler``; jobs, metrics, checkpoints and labels
are rows the test writes into the store, with fixed values (and fixed times where a time is on
screen); random seeds, the sub-title and the working directory are fixed; cursors do not blink and
indeterminate progress bars do not move.

Update after a deliberate change with

    pytest tests/test_app_snapshots.py --snapshot-update

then look at the pictures in ``snapshot_report.html`` (written on a failing run) or open the SVGs
in ``tests/__snapshots__/test_app_snapshots/`` before committing them; run once more without
``--snapshot-update`` to see them pass.
"""

from __future__ import annotations

import math
import random
import sqlite3
from contextlib import closing
from pathlib import Path
from types import SimpleNamespace

from conftest import PROMPTS, FakeSampler, shown, synthetic_pairs, wait_for
from textual.pilot import Pilot
from textual.widgets import Input, Static, TextArea

from rlhf.jobs import died_message
from rlhf.preferences import record_label
from rlhf.reward_eval import LabeledPairScore
from rlhf.store import PROBE_SOURCE
from workbench.app import WorkbenchApp
from workbench.messages import LabeledPairsScored
from workbench.screens.dialogs import ExportDialog, ImportDialog, PromptEditor, RuleDialog, VersionPicker
from workbench.screens.disagreements import DisagreementsScreen
from workbench.screens.drift import DriftScreen
from workbench.screens.dpo import DPOScreen
from workbench.screens.help import HelpScreen
from workbench.screens.ppo import PPOScreen
from workbench.screens.train import TrainScreen

WIDE = (140, 34)
TALL = (140, 44)   # PPO: eight plots and the rollouts table; drift: plots below two warnings
FIXED_TIME = "2025-03-14T09:26:53.000+00:00"


# --- helpers -----------------------------------------------------------------------------


def _app(store) -> WorkbenchApp:
    store.add_prompts(PROMPTS)
    app = WorkbenchApp(store, k=4, labeler="tester", sampler=FakeSampler(cut_every=3), rng=random.Random(0))
    app.sub_title = "workbench.db"  # the real one is a fresh temporary path each run
    app.animation_level = "none"    # an indeterminate progress bar would move with the clock
    return app


def _steady(pilot: Pilot) -> None:
    """No blinking cursor: the picture would depend on when it was taken."""
    for widget in pilot.app.screen.query(Input):
        widget.cursor_blink = False
    for widget in pilot.app.screen.query(TextArea):
        widget.cursor_blink = False


async def _settle(pilot: Pilot) -> None:
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()


async def _open(pilot: Pilot, key: str, screen_type: type) -> None:
    """Press the key that opens a screen or dialog and wait until it is on top."""
    await pilot.press(key)
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, screen_type))
    _steady(pilot)
    await _settle(pilot)


async def _label_screen_ready(pilot: Pilot) -> None:
    await shown(pilot, pilot.app)
    await _settle(pilot)


def _status(pilot: Pilot, selector: str) -> str:
    return str(pilot.app.screen.query_one(selector, Static).content)


def _fix_times(store, table: str) -> None:
    """The store stamps rows with the real time; a picture that shows one needs a fixed one."""
    with closing(sqlite3.connect(store.path)) as db, db:
        db.execute(f"UPDATE {table} SET created_at = ?", [FIXED_TIME])


def _finished_reward_job(store, tmp_path: Path) -> int:
    """A reward job that trained 24 steps (loss, accuracy, held-out accuracy every 6) and saved v1."""
    job_id = store.create_job("reward", {"sources": "all", "epochs": None}, total_steps=24)
    store.update_job(job_id, status="running", pid=4242)
    for step in range(1, 25):
        values = {"loss": 0.69 * math.exp(-step / 10) + 0.15 + 0.03 * math.sin(step),
                  "accuracy": min(0.95, 0.5 + 0.02 * step + 0.02 * math.cos(step))}
        if step % 6 == 0:
            values["eval/accuracy"] = 0.5 + 0.012 * step
        store.log_metrics(job_id, step, values)
    store.update_job(job_id, status="done", finished_at=FIXED_TIME)
    store.add_checkpoint("reward", tmp_path / "reward-v1", job_id=job_id,
                         meta={"eval_accuracy": 0.78, "eval_pairs": 40, "epochs": 3, "length_corr": 0.12,
                               "labels_prefer_longer": 0.55, "length_pairs": 40})
    return job_id


# --- labeling ----------------------------------------------------------------------------


class TestLabelScreen:
    def test_label_screen_wide_with_a_ranking_under_way(self, store, snap_compare):
        """F1, wide: four completions side by side, three of them ranked."""

        async def run_before(pilot: Pilot) -> None:
            await shown(pilot, pilot.app)
            await pilot.press("m", "3")
            await _settle(pilot)

        assert snap_compare(_app(store), terminal_size=WIDE, run_before=run_before)

    def test_label_screen_narrow_stacks_completions(self, store, snap_compare):
        """F1, narrow: the completions stack and the prompt list hides."""
        assert snap_compare(_app(store), terminal_size=(80, 34), run_before=_label_screen_ready)


class TestLabelDialogs:
    def test_add_prompt_opens_an_empty_editor(self, store, snap_compare):
        """a: the prompt editor, empty."""

        async def run_before(pilot: Pilot) -> None:
            await _label_screen_ready(pilot)
            await _open(pilot, "a", PromptEditor)

        assert snap_compare(_app(store), terminal_size=WIDE, run_before=run_before)

    def test_edit_prompt_opens_the_editor_on_the_prompt_shown(self, store, snap_compare):
        """e: the prompt editor holding the current prompt's text."""

        async def run_before(pilot: Pilot) -> None:
            await _label_screen_ready(pilot)
            await _open(pilot, "e", PromptEditor)

        assert snap_compare(_app(store), terminal_size=WIDE, run_before=run_before)

    def test_export_dialog(self, store, snap_compare, monkeypatch):
        """x: format, output path (beside the working directory) and the conversational switch."""
        monkeypatch.chdir("/")  # the default path is the working directory's

        async def run_before(pilot: Pilot) -> None:
            await _label_screen_ready(pilot)
            await _open(pilot, "x", ExportDialog)

        assert snap_compare(_app(store), terminal_size=WIDE, run_before=run_before)

    def test_import_dialog_completes_a_path(self, store, tmp_path, snap_compare, monkeypatch):
        """i: a path typed in part, the rest of a preference file suggested after it."""
        (tmp_path / "prefs.jsonl").write_text("")
        monkeypatch.chdir(tmp_path)  # a relative path: the picture does not show the temporary folder

        async def run_before(pilot: Pilot) -> None:
            await _label_screen_ready(pilot)
            await _open(pilot, "i", ImportDialog)
            await pilot.press(*"pre")
            path = pilot.app.screen.query_one("#import-path")
            await wait_for(pilot, lambda: path._suggestion == "prefs.jsonl")
            await pilot.pause()

        assert snap_compare(_app(store), terminal_size=WIDE, run_before=run_before)

    def test_version_picker_lists_the_policy_versions(self, store, tmp_path, snap_compare):
        """v: base model, two trained versions (the latest, sampled from, marked) and, with a reward
        model, best-of-4 and best-of-16 of the base."""
        job_id = store.create_job("ppo", {})
        store.update_job(job_id, status="done")
        store.add_checkpoint("policy", tmp_path / "policy-v1", parent_version=0)
        store.add_checkpoint("policy", tmp_path / "policy-v2", parent_version=1, job_id=job_id)
        store.add_checkpoint("reward", tmp_path / "reward-v1")
        _fix_times(store, "checkpoints")

        async def run_before(pilot: Pilot) -> None:
            await _label_screen_ready(pilot)
            await _open(pilot, "v", VersionPicker)

        assert snap_compare(_app(store), terminal_size=WIDE, run_before=run_before)

    def test_rule_dialog(self, store, snap_compare):
        """g: the rule of a scripted labeler, with the built-in rules listed."""

        async def run_before(pilot: Pilot) -> None:
            await _label_screen_ready(pilot)
            await _open(pilot, "g", RuleDialog)

        assert snap_compare(_app(store), terminal_size=WIDE, run_before=run_before)

    def test_rule_dialog_refuses_an_unknown_rule(self, store, snap_compare):
        """g, then an unknown rule and enter: the dialog stays open and says why."""

        async def run_before(pilot: Pilot) -> None:
            await _label_screen_ready(pilot)
            await _open(pilot, "g", RuleDialog)
            await pilot.press(*"tallest", "enter")
            await wait_for(pilot, lambda: "unknown rule" in str(pilot.app.screen.query_one("#rule-error").content))
            await pilot.pause()

        assert snap_compare(_app(store), terminal_size=WIDE, run_before=run_before)


class TestHelp:
    def test_help_screen(self, store, snap_compare):
        """?: the keys of the labeling screen, over it."""

        async def run_before(pilot: Pilot) -> None:
            await _label_screen_ready(pilot)
            await _open(pilot, "question_mark", HelpScreen)

        assert snap_compare(_app(store), terminal_size=(120, 44), run_before=run_before)


# --- reward model: Train screen and disagreements ---------------------------------------------


async def _train_screen(pilot: Pilot, ready: str) -> None:
    """F2, once the first poll has filled the status line with ``ready``."""
    await _label_screen_ready(pilot)
    await _open(pilot, "f2", TrainScreen)
    await wait_for(pilot, lambda: ready in _status(pilot, "#train-status"))
    await _settle(pilot)


class TestTrainScreen:
    def test_idle_with_no_job(self, store, snap_compare):
        """F2 before any training: empty plots; the status line says how many pairs and s to train."""
        synthetic_pairs(store, 12)

        async def run_before(pilot: Pilot) -> None:
            await _train_screen(pilot, "No reward model trained yet")

        assert snap_compare(_app(store), terminal_size=WIDE, run_before=run_before)

    def test_after_a_finished_job(self, store, tmp_path, snap_compare):
        """F2 after job 1 saved reward v1: held-out accuracy and length check; loss and accuracy plots."""
        synthetic_pairs(store, 40)
        _finished_reward_job(store, tmp_path)

        async def run_before(pilot: Pilot) -> None:
            await _train_screen(pilot, "reward v1 (job 1)")

        assert snap_compare(_app(store), terminal_size=WIDE, run_before=run_before)

    def test_after_a_failed_job(self, store, snap_compare):
        """F2 after a job whose process died at step 5 of 20: the reason on the status line."""
        synthetic_pairs(store, 40)
        job_id = store.create_job("reward", {"sources": "all"}, total_steps=20)
        store.update_job(job_id, status="running", pid=4242)
        for step in range(1, 6):
            store.log_metrics(job_id, step, {"loss": 0.7 - 0.03 * step, "accuracy": 0.5 + 0.02 * step})
        store.update_job(job_id, status="failed", error=died_message(store.job(job_id)), finished_at=FIXED_TIME)

        async def run_before(pilot: Pilot) -> None:
            await _train_screen(pilot, "job 1 failed")

        assert snap_compare(_app(store), terminal_size=WIDE, run_before=run_before)


SCORED = [
    LabeledPairScore(1, 1, "Explain photosynthesis to a child.", "Plants eat sunlight to make sugar.",
                     "Photosynthesis is the process by which chlorophyll-containing organisms convert light.",
                     -0.42, 1.31),
    LabeledPairScore(2, 2, "Write a haiku about rain.", "Soft rain on the roof / the gutters hum their one "
                     "song / tea cools by the door", "Rain rain rain.", 0.88, 0.21),
    LabeledPairScore(3, 3, "What is 17 times 23?", "391", "17 times 23 is 401.", 0.35, 0.47),
    LabeledPairScore(4, 4, "Name a prime number above 100.", "101", "100 is prime.", 1.10, -0.60),
    LabeledPairScore(5, 5, "Translate 'thank you' into French.", "merci", "gracias", 0.05, 0.90),
]


class TestDisagreements:
    def test_without_a_model(self, store, tmp_path, snap_compare):
        """d on the Train screen, no model loaded: the screen says scores need it."""
        synthetic_pairs(store, 40)
        _finished_reward_job(store, tmp_path)

        async def run_before(pilot: Pilot) -> None:
            await _train_screen(pilot, "reward v1 (job 1)")
            await _open(pilot, "d", DisagreementsScreen)
            await wait_for(pilot, lambda: "not loaded" in _status(pilot, "#disagree-status"))

        assert snap_compare(_app(store), terminal_size=WIDE, run_before=run_before)

    def test_with_scored_pairs(self, store, tmp_path, snap_compare):
        """d with the labeled pairs scored (a fake scorer, no model): the mistakes, worst first."""
        synthetic_pairs(store, 40)
        _finished_reward_job(store, tmp_path)
        app = _app(store)
        host = app.model_host
        host.stack = SimpleNamespace(policy_version=0)  # "a model is loaded": only its presence is read
        # Labeled pairs already scored (reward v1), no model: the answer the host would post.
        host.score_labeled = lambda requester: requester.post_message(LabeledPairsScored(SCORED, 1))

        async def run_before(pilot: Pilot) -> None:
            await _train_screen(pilot, "reward v1 (job 1)")
            await _open(pilot, "d", DisagreementsScreen)
            await wait_for(pilot, lambda: "disagreements" in _status(pilot, "#disagree-status"))
            await pilot.pause()

        assert snap_compare(app, terminal_size=WIDE, run_before=run_before)


# --- PPO screen ------------------------------------------------------------------------------


def _finished_ppo_session(store, tmp_path: Path) -> None:
    """PPO job 1: ten iterations logged, policy v1 and v2 saved, the last batch's rollouts written."""
    job_id = store.create_job("ppo", {"iterations": 10, "beta": 0.05, "adaptive_kl": False}, total_steps=10)
    store.update_job(job_id, status="running", pid=4242)
    for it in range(1, 11):
        store.log_metrics(job_id, it, {
            "objective/scores": -0.4 + 0.11 * it + 0.05 * math.sin(it),
            "objective/scores_std": 0.9 - 0.03 * it,
            "objective/kl": 0.02 * it * it,
            "beta": 0.05,
            "objective/entropy": 2.1 - 0.06 * it,
            "policy/clipfrac": 0.02 + 0.01 * abs(math.sin(it)),
            "val/ratio": 1.0 + 0.002 * it,
            "val/eos_fraction": min(1.0, 0.55 + 0.04 * it),
            "val/completion_tokens": 38 - 1.2 * it,
            "val/score_length_corr": -0.1 + 0.02 * it,
        })
    store.add_checkpoint("policy", tmp_path / "policy-v1", job_id=job_id, parent_version=0,
                         meta={"rollout_score": 0.1, "kl": 0.3})
    store.add_checkpoint("policy", tmp_path / "policy-v2", job_id=job_id, parent_version=1,
                         meta={"rollout_score": 0.6, "kl": 1.8})
    store.update_job(job_id, status="done", finished_at=FIXED_TIME)
    rows = [{"prompt": p, "completion": c, "score": s, "kl": k, "n_tokens": len(c.split()) + 2,
             "finish_reason": "eos"} for p, c, s, k in (
        ("Explain photosynthesis to a child.", "Plants use sunlight, water and air to make their own food.",
         1.42, 0.81),
        ("Write a haiku about rain.", "Soft rain on the roof\nthe gutters hum their one song\ntea cools by the door",
         0.97, 2.10),
        ("What is 17 times 23?", "17 times 23 is 391.", 0.55, 0.12),
        ("Name a prime number above 100.", "101 is the first prime above 100.", 0.31, 0.40),
        ("Translate 'thank you' into French.", "Merci.", -0.20, 0.05),
    )]
    store.add_rollouts(job_id, 9, 1, [dict(r, score=r["score"] - 0.3) for r in rows[1:]])
    store.add_rollouts(job_id, 10, 2, rows)


class TestPPOScreen:
    def test_idle_with_no_session(self, store, snap_compare):
        """F3 before any session: empty plots and rollouts; the status line says s starts one."""

        async def run_before(pilot: Pilot) -> None:
            await _label_screen_ready(pilot)
            await _open(pilot, "f3", PPOScreen)
            await wait_for(pilot, lambda: "No PPO session yet" in _status(pilot, "#ppo-status"))
            await _settle(pilot)

        assert snap_compare(_app(store), terminal_size=TALL, run_before=run_before)

    def test_after_a_finished_session(self, store, tmp_path, snap_compare):
        """F3 after a ten-iteration session saved v2: latest figures, the plots and the last batch."""
        _finished_ppo_session(store, tmp_path)

        async def run_before(pilot: Pilot) -> None:
            await _label_screen_ready(pilot)
            await _open(pilot, "f3", PPOScreen)
            screen = pilot.app.screen
            await wait_for(pilot, lambda: "PPO job 1 done" in _status(pilot, "#ppo-status")
                           and screen.query_one("#ppo-rollouts").row_count == 5)
            await _settle(pilot)

        assert snap_compare(_app(store), terminal_size=TALL, run_before=run_before)


# --- drift screen ----------------------------------------------------------------------------


def _drift_label(store, versions_shown: list[int], kind: str, choice: list[int] | None = None) -> None:
    prompt_id = store.add_prompt(f"probe {len(store.comparisons('drift'))}", source=PROBE_SOURCE)
    ids = store.add_completions(prompt_id, [{"text": f"answer of v{v}", "n_tokens": 1, "finish_reason": "eos",
                                             "policy_version": v} for v in versions_shown])
    record_label(store, prompt_id, ids, kind, choice, purpose="drift")


class TestDriftScreen:
    def test_with_no_trained_policy(self, store, snap_compare):
        """F4 before any PPO session: the status line says to run one."""

        async def run_before(pilot: Pilot) -> None:
            await _label_screen_ready(pilot)
            await _open(pilot, "f4", DriftScreen)
            await wait_for(pilot, lambda: "No trained policy yet" in _status(pilot, "#drift-status"))
            await _settle(pilot)

        assert snap_compare(_app(store), terminal_size=WIDE, run_before=run_before)

    def test_versions_with_labels_and_an_over_optimization_warning(self, store, tmp_path, snap_compare):
        """F4 with three PPO versions, a DPO version and best-of-4, labeled blind: win-rate and reward
        against KL by method, the table with v1 highlighted and named; v2's reward rose while its
        win-rate fell, so the warning lines show. No answers (they need the model)."""
        ppo = {"algorithm": "ppo", "beta": 0.05, "learning_rate": 1e-4}
        for parent, score, kl in ((0, 0.1, 0.0), (1, 0.5, 2.0), (2, 0.9, 5.0)):
            store.add_checkpoint("policy", tmp_path / f"policy-v{parent + 1}", parent_version=parent,
                                 meta={"rollout_score": score, "kl": kl, "job_id": 1, "iteration": parent + 1,
                                       "config": ppo})
        store.add_checkpoint("policy", tmp_path / "policy-v4", parent_version=0,
                             meta={"kl": 3.1, "job_id": 2, "iteration": 2, "method": "dpo", "config": {"beta": 0.1}})
        for _ in range(3):
            _drift_label(store, [4, 0], "best", [0])   # DPO's v4 wins three of four
        _drift_label(store, [0, 4], "best", [0])
        prompt_id = store.add_prompt("probe best-of", source=PROBE_SOURCE)
        for winner in (0, 1, 0):                       # best-of-4 wins two of three
            ids = store.add_completions(prompt_id, [
                {"text": "best of four", "n_tokens": 1, "finish_reason": "eos", "policy_version": 0, "best_of": 4,
                 "reward_version": 1},
                {"text": "reference", "n_tokens": 1, "finish_reason": "eos", "policy_version": 0}])
            record_label(store, prompt_id, ids, "best", [winner], purpose="drift")
        for _ in range(4):
            _drift_label(store, [1, 0], "best", [0])   # v1 wins four ...
        _drift_label(store, [0, 1], "best", [0])       # ... and loses one
        _drift_label(store, [2, 0], "best", [0])       # v2 wins one,
        for _ in range(3):
            _drift_label(store, [0, 2], "best", [0])   # loses three,
        _drift_label(store, [2, 0], "tie")             # ties one

        async def run_before(pilot: Pilot) -> None:
            await _label_screen_ready(pilot)
            await _open(pilot, "f4", DriftScreen)
            await wait_for(pilot, lambda: "policy v4 side by side" in _status(pilot, "#drift-status")
                           and "v1: ppo" in _status(pilot, "#drift-selected"))
            await _settle(pilot)

        assert snap_compare(_app(store), terminal_size=TALL, run_before=run_before)


# --- DPO screen ------------------------------------------------------------------------------


def _finished_dpo_job(store, tmp_path: Path) -> None:
    """A DPO job of 3 epochs x 4 steps: falling loss, rising accuracy and margin, KL per epoch, v1-v3."""
    job_id = store.create_job("dpo", {"dpo": {"beta": 0.1, "epochs": 3}}, total_steps=12)
    store.update_job(job_id, status="running", pid=4242)
    for step in range(1, 13):
        values = {"loss": 0.69 * math.exp(-step / 8) + 0.1 + 0.02 * math.sin(step), "epoch": 1 + (step - 1) // 4,
                  "rewards/accuracies": min(1.0, 0.45 + 0.04 * step + 0.05 * math.cos(step)),
                  "rewards/chosen": 0.02 * step, "rewards/rejected": -0.03 * step,
                  "rewards/margins": 0.05 * step}
        if step % 4 == 0:
            values |= {"eval/loss": 0.69 - 0.02 * step, "eval/rewards/accuracies": 0.5 + 0.015 * step,
                       "objective/kl": 0.4 * step / 4}
        store.log_metrics(job_id, step, values)
    for epoch in (1, 2, 3):
        store.add_checkpoint("policy", tmp_path / f"policy-v{epoch}", job_id=job_id, parent_version=epoch - 1,
                             meta={"iteration": epoch, "method": "dpo", "kl": 0.4 * epoch,
                                   "eval_accuracy": 0.5 + 0.06 * epoch, "eval_pairs": 20})
    store.update_job(job_id, status="done", step=12, finished_at=FIXED_TIME)


class TestDPOScreen:
    def test_idle_with_no_job(self, store, snap_compare):
        """F5 before any DPO run: empty plots; the status line says s trains the policy on the pairs."""

        async def run_before(pilot: Pilot) -> None:
            await _label_screen_ready(pilot)
            await _open(pilot, "f5", DPOScreen)
            await wait_for(pilot, lambda: "No DPO run yet" in _status(pilot, "#dpo-status"))
            await _settle(pilot)

        assert snap_compare(_app(store), terminal_size=WIDE, run_before=run_before)

    def test_after_a_finished_job(self, store, tmp_path, snap_compare):
        """F5 after three epochs saved v1-v3: the four plots and the last version's figures."""
        _finished_dpo_job(store, tmp_path)

        async def run_before(pilot: Pilot) -> None:
            await _label_screen_ready(pilot)
            await _open(pilot, "f5", DPOScreen)
            await wait_for(pilot, lambda: "saved v1-v3" in _status(pilot, "#dpo-status"))
            await _settle(pilot)

        assert snap_compare(_app(store), terminal_size=WIDE, run_before=run_before)
