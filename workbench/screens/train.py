"""The Train screen: start a reward-model job, watch it learn, cancel it.

Following the job is the JobScreen's (workbench/screens/job_screen.py); this
screen adds the pairs and epochs to train with, the loss and accuracy plots
(textual-plotext), and a status line with the held-out accuracy of what a job
saved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Button, Label, ProgressBar, Select, Static
from textual_plotext import PlotextPlot

from rlhf.reward_config import RewardConfig, held_out_name
from rlhf.rows import Checkpoint, Job
from rlhf.stats import rate_text
from rlhf.store import Store
from workbench.job_follow import Series
from workbench.screens.job_screen import JobSnapshot, StartCancelScreen

# Plotted series: (metric name, legend label), per plot.
LOSS_SERIES = (("loss", "loss"),)
ACCURACY_SERIES = (("accuracy", "accuracy"), ("eval/accuracy", "held-out accuracy"))
# Epochs: 'auto' lets the held-out loss decide (early stopping); a number fixes them.
AUTO = "auto"
EPOCH_CHOICES = [("auto (held-out)", AUTO), *[(str(n), n) for n in (1, 2, 4, 8)]]


@dataclass
class Snapshot(JobSnapshot):
    """What one poll read from the store."""

    checkpoint: Checkpoint | None = None
    pairs_labeled: int = 0
    pairs_imported: int = 0


def length_check(meta: dict[str, Any]) -> str:
    """Length, the first suspect (Singhal et al. 2023): how the scores of the
    labeled completions follow their length, and how often the labels chose the
    longer one."""
    corr, longer = meta.get("length_corr"), meta.get("labels_prefer_longer")
    text = f"score~length r {corr:+.2f}" if corr is not None else "score~length r -"
    if longer is not None:
        text += f", labels chose the longer in {longer:.0%} of {meta.get('length_pairs', 0)} pairs"
    return text


class TrainScreen(StartCancelScreen[Snapshot]):
    BINDINGS = [
        Binding("s", "start", "Start", tooltip="Start training a reward model on the recorded pairs"),
        Binding("c", "cancel", "Cancel", tooltip="Cancel the running training job (stops within one step)"),
        Binding("d", "disagreements", "Disagreements", tooltip="Labeled pairs the reward model gets wrong"),
    ]
    KIND = "reward"
    PREFIX = "train"
    FIRST_STEP = -1
    IDLE = "no training job is running"
    BUSY = "job {job.id} is still {job.status}: cancel it first (c)"
    REQUESTED = {"cancel": "cancelling job {id} (it stops after the current step)"}

    def compose_body(self) -> ComposeResult:
        yield Static("", id="train-status", markup=False)
        with Horizontal(id="train-controls"):
            yield Label("pairs", classes="train-label")
            yield Select([("all", "all"), ("labeled", "label"), ("imported", "import")],
                         value=RewardConfig().sources, allow_blank=False, id="train-sources")
            yield Label("epochs", classes="train-label")
            yield Select(EPOCH_CHOICES, value=AUTO, allow_blank=False, id="train-epochs")
            yield Button("Start", id="train-start", variant="primary")
            yield Button("Cancel", id="train-cancel", variant="error")
        yield ProgressBar(total=None, show_eta=True, id="train-progress")
        with Horizontal(id="train-plots"):
            yield PlotextPlot(id="loss-plot")
            yield PlotextPlot(id="accuracy-plot")

    # -- the job as this screen shows it

    def read(self, store: Store, job: Job | None, new_metrics: Series, first_read: bool) -> Snapshot:
        stats = store.stats()
        return Snapshot(job, new_metrics, checkpoint=store.checkpoint("reward"),
                        pairs_labeled=stats["pairs_labeled"], pairs_imported=stats["pairs_imported"])

    def show(self, snap: Snapshot) -> None:
        self.query_one("#train-status", Static).update(self.status_text(snap))
        self.show_buttons(snap.job)

    def finished(self, job: Job, snap: Snapshot) -> None:
        if job.status == "done":
            checkpoint = snap.checkpoint
            self.notify(f"reward model v{checkpoint.version if checkpoint else '?'} is ready")
            self.wb.model_host.measure_agreement(self)  # the figure the labeling screen shows
        elif job.status == "failed":
            self.notify(f"training failed: {job.error}", severity="error", timeout=10)
        else:
            self.notify(f"training {job.status}")

    def status_text(self, snap: Snapshot) -> str:
        job = snap.job
        pairs = f"{snap.pairs_labeled} labeled + {snap.pairs_imported} imported pairs"
        if job is None:
            return f"No reward model trained yet. {pairs}. Press s to train one."
        head = f"job {job.id} {job.status}"
        if job.active:
            total = job.total_steps or "?"
            if job.status == "queued" or (job.step == 0 and job.status == "running"):
                return f"{head}: loading the model and the pairs ({pairs})"
            if job.total_steps and job.step >= job.total_steps:
                return f"{head}: trained {total} steps; scoring the labeled completions"
            return f"{head}: step {job.step}/{total}{self._latest_figures()}"
        if job.status == "failed":
            return f"{head}: {job.error or 'no reason recorded'}"
        if job.status == "cancelled":
            return f"{head} at step {job.step}. {pairs}. Press s to train again."
        checkpoint = snap.checkpoint
        if checkpoint is None:
            return f"{head}. {pairs}."
        meta = checkpoint.meta
        parts = [f"reward v{checkpoint.version} (job {checkpoint.job_id}): {held_out_name(meta)} accuracy "
                 + rate_text(meta.get("eval_accuracy"), int(meta.get("eval_pairs", 0)),
                             independent=meta.get("eval_elements"))]
        if "epochs" in meta:
            parts.append(f"{meta['epochs']:.0f} epochs")
        if "length_corr" in meta:
            parts.append(length_check(meta))
        return ", ".join(parts) + f". {pairs}."

    def _latest_figures(self) -> str:
        parts = []
        for name, label in (("loss", "loss"), ("accuracy", "accuracy"), ("eval/accuracy", "held-out")):
            if self.series.get(name):
                parts.append(f"{label} {self.series[name][-1][1]:.3f}")
        return ("  ·  " + "  ·  ".join(parts)) if parts else ""

    def draw(self) -> None:
        for plot_id, title, series, ylim in (("#loss-plot", "loss", LOSS_SERIES, None),
                                             ("#accuracy-plot", "accuracy", ACCURACY_SERIES, (0.0, 1.0))):
            widget = self.query_one(plot_id, PlotextPlot)
            plt = widget.plt
            plt.clear_data()
            plt.title(title)
            plt.xlabel("step")
            if ylim:
                plt.ylim(*ylim)
            for name, label in series:
                points = self.series.get(name)
                if points:
                    plt.plot([s for s, _ in points], [v for _, v in points], label=label,
                             marker="dot" if name.startswith("eval/") else "braille")
            widget.refresh()

    # -- actions

    def job_config(self) -> dict[str, Any]:
        """A reward job's config: the chosen options and the app's base model."""
        epochs = self.query_one("#train-epochs", Select).value
        return self.full_config({"reward": {"sources": self.query_one("#train-sources", Select).value,
                                            "epochs": None if epochs == AUTO else epochs}})

    def launch(self, config: dict[str, Any]) -> None:
        from rlhf import jobs
        from rlhf.reward import check_pairs
        from rlhf.reward_config import RewardJob

        job = RewardJob.from_dict(config)
        check_pairs(self.wb.store, job.reward.sources)
        job_id = jobs.start_job(self.wb.store, "reward", job.to_dict())
        self.notify(f"started reward job {job_id}")

    def action_disagreements(self) -> None:
        from workbench.screens.disagreements import DisagreementsScreen

        self.app.push_screen(DisagreementsScreen())

