"""The Train screen: start a reward-model job, watch it learn, cancel it.

The job runs in its own process (rlhf.jobs); this screen only reads the store.
A timer starts a worker thread that reads the job row and the metric rows added
since the last read, and hands them back to the event loop, which redraws the
plots (textual-plotext) and the progress bar. Nothing here waits on training,
so labeling can go on in the other mode while a job runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Button, Label, ProgressBar, Select, Static
from textual_plotext import PlotextPlot

from rlhf.rows import Checkpoint, Job
from rlhf.stats import rate_text
from workbench.job_follow import just_finished, merge_new_points
from workbench.screens.base import WorkbenchScreen

POLL_S = 1.0
# Plotted series: (metric name, legend label), per plot.
LOSS_SERIES = (("loss", "loss"),)
ACCURACY_SERIES = (("accuracy", "accuracy"), ("eval/accuracy", "held-out accuracy"))
# Epochs: 'auto' lets the held-out loss decide (early stopping); a number fixes them.
AUTO = "auto"
EPOCH_CHOICES = [("auto (held-out)", AUTO), *[(str(n), n) for n in (1, 2, 4, 8)]]


@dataclass
class Snapshot:
    """What one poll read from the store."""

    job: Job | None
    new_metrics: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
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


class TrainScreen(WorkbenchScreen):
    BINDINGS = [
        Binding("s", "start", "Start", tooltip="Start training a reward model on the recorded pairs"),
        Binding("c", "cancel", "Cancel", tooltip="Cancel the running training job (stops within one step)"),
        Binding("d", "disagreements", "Disagreements", tooltip="Labeled pairs the reward model gets wrong"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.job_id: int | None = None      # the job the plots show
        self.job: Job | None = None
        self.last_step = -1                 # metrics read up to this step
        self.series: dict[str, list[tuple[int, float]]] = {}
        # Extra RewardConfig fields for jobs started here (tests make them tiny).
        self.job_defaults: dict[str, Any] = {}

    def compose_body(self) -> ComposeResult:
        yield Static("", id="train-status", markup=False)
        with Horizontal(id="train-controls"):
            yield Label("pairs", classes="train-label")
            yield Select([("all", "all"), ("labeled", "label"), ("imported", "import")], value="all",
                         allow_blank=False, id="train-sources")
            yield Label("epochs", classes="train-label")
            yield Select(EPOCH_CHOICES, value=AUTO, allow_blank=False, id="train-epochs")
            yield Button("Start", id="train-start", variant="primary")
            yield Button("Cancel", id="train-cancel", variant="error")
        yield ProgressBar(total=None, show_eta=True, id="train-progress")
        with Horizontal(id="train-plots"):
            yield PlotextPlot(id="loss-plot")
            yield PlotextPlot(id="accuracy-plot")

    def on_mount(self) -> None:
        self._draw()
        self.poll()
        self.set_interval(POLL_S, self.poll)

    def on_screen_resume(self) -> None:
        self.poll()

    # -- reading the store (in a worker)

    def poll(self) -> None:
        self._read_store()

    @work(thread=True, exclusive=True, group="train-poll", exit_on_error=False)
    def _read_store(self) -> None:
        from rlhf import jobs

        store = self.wb.store
        job_id, after = self.job_id, self.last_step
        if job_id is not None and self.job is not None and self.job.active:
            jobs.refresh(store)  # a killed job shows as failed
        latest = jobs.latest_job(store, "reward")
        if latest is not None and latest.id != job_id:
            job_id, after = latest.id, -1
        snap = Snapshot(job=latest, checkpoint=store.checkpoint("reward"))
        if job_id is not None:
            snap.new_metrics = store.metrics(job_id, after_step=after)
        stats = store.stats()
        snap.pairs_labeled, snap.pairs_imported = stats["pairs_labeled"], stats["pairs_imported"]
        self.app.call_from_thread(self._apply, snap)

    # -- showing it (on the event loop)

    def _apply(self, snap: Snapshot) -> None:
        job = snap.job
        if job is not None and job.id != self.job_id:
            self.job_id, self.last_step, self.series = job.id, -1, {}
        finished_now = just_finished(self.job, job)
        self.job = job
        last_step = merge_new_points(self.series, snap.new_metrics, self.last_step)
        if last_step is not None:
            self.last_step = last_step
            self._draw()
        self._progress(job)
        self.query_one("#train-status", Static).update(self.status_text(snap))
        self.query_one("#train-cancel", Button).disabled = job is None or not job.active
        self.query_one("#train-start", Button).disabled = job is not None and job.active
        if finished_now:
            self._finished(job, snap.checkpoint)

    def _finished(self, job: Job, checkpoint: Checkpoint | None) -> None:
        if job.status == "done":
            self.notify(f"reward model v{checkpoint.version if checkpoint else '?'} is ready")
            self.wb.model_host.measure_agreement(self)  # the figure the labeling screen shows
        elif job.status == "failed":
            self.notify(f"training failed: {job.error}", severity="error", timeout=10)
        else:
            self.notify(f"training {job.status}")

    def _progress(self, job: Job | None) -> None:
        bar = self.query_one("#train-progress", ProgressBar)
        if job is None or not job.total_steps:
            bar.update(total=None)
            return
        bar.update(total=job.total_steps, progress=job.step)

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
        parts = [f"reward v{checkpoint.version} (job {checkpoint.job_id}): held-out accuracy "
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

    def _draw(self) -> None:
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
        """A RewardConfig dict: the chosen options and the app's base model."""
        epochs = self.query_one("#train-epochs", Select).value
        config: dict[str, Any] = {"sources": self.query_one("#train-sources", Select).value,
                                  "epochs": None if epochs == AUTO else epochs}
        return {**config, **self.wb.model_host.base_model(), **self.job_defaults}

    def action_start(self) -> None:
        if self.job is not None and self.job.active:
            self.notify(f"job {self.job.id} is still {self.job.status}: cancel it first (c)", severity="warning")
            return
        self._start(self.job_config())

    @work(thread=True, exclusive=True, group="train-start", exit_on_error=False)
    def _start(self, config: dict[str, Any]) -> None:
        from rlhf import jobs
        from rlhf.reward import RewardConfig, check_pairs

        check_pairs(self.wb.store, RewardConfig.from_dict(config).sources)
        job_id = jobs.start_job(self.wb.store, "reward", config)
        self.app.call_from_thread(self.notify, f"started reward job {job_id}")
        self.app.call_from_thread(self.poll)

    def action_cancel(self) -> None:
        if self.job is None or not self.job.active:
            self.notify("no training job is running")
            return
        self._cancel(self.job.id)

    @work(thread=True, group="train-cancel", exit_on_error=False)
    def _cancel(self, job_id: int) -> None:
        from rlhf import jobs

        jobs.request(self.wb.store, job_id, "cancel")
        self.app.call_from_thread(self.notify, f"cancelling job {job_id} (it stops after the current step)")

    def action_disagreements(self) -> None:
        from workbench.screens.disagreements import DisagreementsScreen

        self.app.push_screen(DisagreementsScreen())

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "train-start":
            self.action_start()
        elif event.button.id == "train-cancel":
            self.action_cancel()
