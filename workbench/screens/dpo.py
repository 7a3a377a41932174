"""The DPO screen: train the policy on the labeled pairs with DPO, watch it learn.

The job (rlhf.dpo, a background process like the reward and PPO jobs) saves a
policy version after each epoch, which the drift view, the labeling queue and
`rlhf eval-policy` take like a PPO version. Following it is the JobScreen's
(workbench/screens/job_screen.py); this screen adds DPO's settings and four
live plots: the loss and the preference accuracy (training batches, and the
held-out pairs at each epoch's end), the implicit rewards beta * log(pi/pi_ref)
of the chosen and the rejected answers, and the KL to the reference measured on
answers the policy samples after each epoch (DPO's loss says nothing of drift).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal
from textual.widgets import Button, Label, ProgressBar, Select, Static
from textual_plotext import PlotextPlot

from rlhf.dpo_config import DPOConfig
from rlhf.rows import Checkpoint, Job
from rlhf.stats import rate_text
from rlhf.store import Store
from workbench.job_follow import Series
from workbench.screens.job_screen import JobSnapshot, StartCancelScreen, choices

DEFAULT = DPOConfig()
# (plot id, title, ((metric, legend label), ...), y limits): training batches as lines,
# held-out figures (logged at each epoch's end) as dots.
PLOTS = (("dpo-loss", "loss", (("loss", "train"), ("eval/loss", "held-out")), None),
         ("dpo-accuracy", "preference accuracy", (("rewards/accuracies", "train"),
                                                  ("eval/rewards/accuracies", "held-out")), (0.0, 1.0)),
         ("dpo-rewards", "implicit reward β·log π/π_ref", (("rewards/chosen", "chosen"),
                                                          ("rewards/rejected", "rejected")), None),
         ("dpo-kl", "KL to the reference (nats/answer)", (("objective/kl", "sampled answers"),), None))
SOURCE_CHOICES = [("labeled", "label"), ("all", "all"), ("imported", "import")]
START_CHOICES = [("latest policy", -1), ("base (v0)", 0)]


@dataclass
class Snapshot(JobSnapshot):
    """What one poll read from the store."""

    versions: list[Checkpoint] | None = None   # the policy versions the followed job saved
    pairs_labeled: int = 0


class DPOScreen(StartCancelScreen[Snapshot]):
    BINDINGS = [
        Binding("s", "start", "Start", tooltip="Train the policy on the labeled pairs with DPO"),
        Binding("c", "cancel", "Cancel", tooltip="Cancel the running DPO job (stops within one step)"),
    ]
    KIND = "dpo"
    PREFIX = "dpo"
    FIRST_STEP = -1
    IDLE = "no DPO job is running"
    BUSY = "job {job.id} is still {job.status}: cancel it first (c)"
    REQUESTED = {"cancel": "cancelling DPO job {id} (it stops after the current step)"}

    def compose_body(self) -> ComposeResult:
        yield Static("", id="dpo-status", markup=False)
        with Horizontal(id="dpo-controls"):
            yield Label("beta", classes="dpo-label")
            yield Select(choices(0.05, DEFAULT.beta, 0.2, 0.5), value=DEFAULT.beta, allow_blank=False,
                         id="dpo-beta")
            yield Label("epochs", classes="dpo-label")
            yield Select(choices(1, 2, DEFAULT.epochs, 5), value=DEFAULT.epochs, allow_blank=False,
                         id="dpo-epochs")
            yield Label("pairs", classes="dpo-label")
            yield Select(SOURCE_CHOICES, value=DEFAULT.sources, allow_blank=False, id="dpo-sources")
            yield Label("from", classes="dpo-label")
            yield Select(START_CHOICES, value=-1, allow_blank=False, id="dpo-from")
            yield Button("Start", id="dpo-start", variant="primary")
            yield Button("Cancel", id="dpo-cancel", variant="error")
        yield ProgressBar(total=None, show_eta=True, id="dpo-progress")
        with Grid(id="dpo-plots"):
            for plot_id, *_ in PLOTS:
                yield PlotextPlot(id=plot_id)

    # -- the job as this screen shows it

    def read(self, store: Store, job: Job | None, new_metrics: Series, first_read: bool) -> Snapshot:
        versions = ([c for c in store.checkpoints("policy") if c.job_id == job.id] if job is not None else [])
        return Snapshot(job, new_metrics, versions=versions, pairs_labeled=store.stats()["pairs_labeled"])

    def show(self, snap: Snapshot) -> None:
        self.query_one("#dpo-status", Static).update(self.status_text(snap))
        self.show_buttons(snap.job)

    def finished(self, job: Job, snap: Snapshot) -> None:
        if job.status == "done":
            last = snap.versions[-1].version if snap.versions else "?"
            self.notify(f"DPO done: policy v{last} saved (v chooses the version to sample from)")
        elif job.status == "failed":
            self.notify(f"DPO failed: {job.error}", severity="error", timeout=10)
        else:
            self.notify(f"DPO {job.status}")

    def status_text(self, snap: Snapshot) -> str:
        job = snap.job
        pairs = f"{snap.pairs_labeled} labeled pairs"
        if job is None:
            return f"No DPO run yet. {pairs}. Press s to train the policy on them with DPO."
        head = f"DPO job {job.id} {job.status}"
        if job.status == "failed":
            return f"{head}: {job.error or 'no reason recorded'}"
        if job.status == "queued" or (job.status == "running" and not self.series):
            return f"{head}: loading the model, the pairs and the reference's log-probs"
        saved = self._versions_text(snap.versions or [])
        if job.active:
            return f"{head}: step {job.step}/{job.total_steps or '?'}{self._latest_figures()}{saved}"
        return f"{head} at step {job.step}{saved}. {pairs}. Press s to run again."

    def _latest_figures(self) -> str:
        parts = []
        for name, label in (("epoch", "epoch"), ("loss", "loss"), ("rewards/accuracies", "accuracy"),
                            ("rewards/margins", "margin")):
            if self.series.get(name):
                value = self.series[name][-1][1]
                parts.append(f"{label} {value:.0f}" if name == "epoch" else f"{label} {value:.3f}")
        return ("  ·  " + "  ·  ".join(parts)) if parts else ""

    @staticmethod
    def _versions_text(versions: list[Checkpoint]) -> str:
        """The versions saved so far, and the latest one's held-out accuracy and KL."""
        if not versions:
            return ""
        last = versions[-1].meta
        span = f"v{versions[0].version}" + (f"-v{versions[-1].version}" if len(versions) > 1 else "")
        figures = []
        if last.get("eval_accuracy") is not None:
            figures.append("held-out accuracy " + rate_text(last["eval_accuracy"], int(last.get("eval_pairs") or 0)))
        if last.get("kl") is not None:
            figures.append(f"KL {last['kl']:.2f} nats")
        return f"\nsaved {span}" + (f"; at v{versions[-1].version}: " + ", ".join(figures) if figures else "")

    def draw(self) -> None:
        for plot_id, title, series, ylim in PLOTS:
            widget = self.query_one(f"#{plot_id}", PlotextPlot)
            plt = widget.plt
            plt.clear_data()
            plt.title(title)
            plt.xlabel("step")
            if ylim:
                plt.ylim(*ylim)
            for name, label in series:
                points = self.series.get(name)
                if not points:
                    continue
                x, y = [s for s, _ in points], [v for _, v in points]
                if name.startswith(("eval/", "objective/")):  # once an epoch: points, not a line
                    plt.scatter(x, y, label=label, marker="●")
                else:
                    plt.plot(x, y, label=label, marker="braille")
            widget.refresh()

    # -- actions

    def job_config(self) -> dict[str, Any]:
        """A DPO job's config: the chosen settings and the app's base model."""
        start = self.query_one("#dpo-from", Select).value
        return self.full_config({
            "init_policy_version": None if start == -1 else start,
            "dpo": {"beta": self.query_one("#dpo-beta", Select).value,
                    "epochs": self.query_one("#dpo-epochs", Select).value,
                    "sources": self.query_one("#dpo-sources", Select).value}})

    def launch(self, config: dict[str, Any]) -> None:
        from rlhf import dpo
        from rlhf.dpo_config import DPOJob

        job_id = dpo.start_job(self.wb.store, DPOJob.from_dict(config))
        self.notify(f"started DPO job {job_id}")

