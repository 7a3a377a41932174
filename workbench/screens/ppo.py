"""The PPO screen: start, pause, resume and stop a PPO session; watch score, KL,
beta, entropy and clip fraction live, reward against KL, and the latest rollouts.

The session runs in its own process (rlhf.jobs, runner rlhf.ppo:run_job); this
screen only reads the store and the rollouts file the job rewrites after each
iteration. A timer starts a worker thread that reads the job row, the metric
rows added since the last read and the latest rollouts, and hands them to the
event loop, which redraws. Nothing here waits on training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal
from textual.widgets import Button, Checkbox, DataTable, Label, ProgressBar, Select, Static
from textual_plotext import PlotextPlot

from rlhf.rows import Job
from workbench.job_follow import just_finished, merge_new_points
from workbench.screens.base import WorkbenchScreen
from workbench.widgets.text import one_line

POLL_S = 1.0
# (metric, label, format) of the latest iteration in the status line, after the score.
FIGURES = (("objective/kl", "KL", "{:.3g}"), ("beta", "beta", "{:.3g}"), ("val/ratio", "ratio", "{:.3g}"),
           ("val/eos_fraction", "EOS", "{:.0%}"), ("val/completion_tokens", "length", "{:.0f}"),
           ("val/score_length_corr", "score~length r", "{:+.2f}"))
# (plot id, title, metric) for the plots over iterations.
PLOTS = (("plot-score", "score", "objective/scores"), ("plot-kl", "KL (nats/seq)", "objective/kl"),
         ("plot-beta", "beta", "beta"), ("plot-entropy", "entropy", "objective/entropy"),
         ("plot-clipfrac", "clip fraction", "policy/clipfrac"),
         # Length, the first suspect of a hacked reward (Singhal et al. 2023), and
         # how many answers finished: TRL's val/num_eos_tokens, as a fraction.
         ("plot-length", "mean length (tokens)", "val/completion_tokens"),
         ("plot-eos", "ended with EOS", "val/eos_fraction"))
ROLLOUT_COLUMNS = ("prompt", "completion", "score", "KL")
REWARD_CHOICES = (("reward model (latest)", ""), ("rule: short answers ending in EOS", "rule:short"),
                  ("rule: distinct tokens", "rule:distinct"))


@dataclass
class Snapshot:
    """What one poll read from the store."""

    job: Job | None
    new_metrics: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    rollouts: list[dict[str, Any]] | None = None
    last_version: int | None = None


class PPOScreen(WorkbenchScreen):
    BINDINGS = [
        Binding("s", "start", "Start", tooltip="Start a PPO session from the latest policy"),
        Binding("c", "continue_session", "Continue", tooltip="Resume a stopped session from its last checkpoint"),
        Binding("p", "control('pause')", "Pause", tooltip="Pause the session after the current iteration"),
        Binding("r", "control('resume')", "Resume", tooltip="Resume a paused session"),
        Binding("e", "control('cancel')", "Stop", tooltip="Stop the session after the current iteration"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.job_id: int | None = None
        self.job: Job | None = None
        self.last_step = 0                  # metrics read up to this iteration
        self.series: dict[str, list[tuple[int, float]]] = {}
        self.rollouts: list[dict[str, Any]] = []
        self.last_version: int | None = None
        # Extra job config for sessions started here (tests make them tiny).
        self.job_defaults: dict[str, Any] = {}

    def compose_body(self) -> ComposeResult:
        yield Static("", id="ppo-status", markup=False)
        with Horizontal(id="ppo-controls"):
            yield Label("iterations", classes="ppo-label")
            yield Select([(str(n), n) for n in (5, 10, 20, 50)], value=10, allow_blank=False, id="ppo-iterations")
            yield Label("beta", classes="ppo-label")
            yield Select([(str(b), b) for b in (0.01, 0.02, 0.05, 0.1)], value=0.05, allow_blank=False,
                         id="ppo-beta")
            yield Checkbox("adaptive KL", id="ppo-adaptive")
            yield Select(list(REWARD_CHOICES), value="", allow_blank=False, id="ppo-reward")
            yield Button("Start", id="ppo-start", variant="primary")
            yield Button("Pause", id="ppo-pause")
            yield Button("Resume", id="ppo-resume")
            yield Button("Stop", id="ppo-stop", variant="error")
        yield ProgressBar(total=None, show_eta=True, id="ppo-progress")
        with Grid(id="ppo-plots"):
            for plot_id, _, _ in PLOTS:
                yield PlotextPlot(id=plot_id)
            yield PlotextPlot(id="plot-reward-kl")
        yield DataTable(id="ppo-rollouts", zebra_stripes=True, cursor_type="row")

    def on_mount(self) -> None:
        table = self.query_one("#ppo-rollouts", DataTable)
        for name in ROLLOUT_COLUMNS:
            table.add_column(name, key=name)
        self._draw()
        self.poll()
        self.set_interval(POLL_S, self.poll)

    def on_screen_resume(self) -> None:
        self.poll()

    # -- reading the store (in a worker)

    def poll(self) -> None:
        self._read_store()

    @work(thread=True, exclusive=True, group="ppo-poll", exit_on_error=False)
    def _read_store(self) -> None:
        from rlhf import jobs
        from rlhf.locations import checkpoints_dir
        from rlhf.ppo import read_rollouts

        store = self.wb.store
        job_id, after = self.job_id, self.last_step
        if self.job is not None and self.job.active:
            jobs.refresh(store)  # a killed session shows as failed
        latest = jobs.latest_job(store, "ppo")
        if latest is not None and latest.id != job_id:
            job_id, after = latest.id, 0
        snap = Snapshot(job=latest)
        if job_id is not None:
            snap.new_metrics = store.metrics(job_id, after_step=after)
            if snap.new_metrics or after == 0:
                snap.rollouts = read_rollouts(checkpoints_dir(store.path), job_id)
        last = store.checkpoint("policy")
        snap.last_version = last.version if last else None
        self.app.call_from_thread(self._apply, snap)

    # -- showing it (on the event loop)

    def _apply(self, snap: Snapshot) -> None:
        job = snap.job
        if job is not None and job.id != self.job_id:
            self.job_id, self.last_step, self.series, self.rollouts = job.id, 0, {}, []
        finished_now = just_finished(self.job, job)
        self.job, self.last_version = job, snap.last_version
        last_step = merge_new_points(self.series, snap.new_metrics, self.last_step)
        if last_step is not None:
            self.last_step = last_step
            self._draw()
        if snap.rollouts is not None and snap.rollouts != self.rollouts:
            self.rollouts = snap.rollouts
            self._fill_rollouts()
        self._progress(job)
        self.query_one("#ppo-status", Static).update(self.status_text())
        active = job is not None and job.active
        self.query_one("#ppo-start", Button).disabled = active
        self.query_one("#ppo-stop", Button).disabled = not active
        self.query_one("#ppo-pause", Button).disabled = not active or job.status == "paused"
        self.query_one("#ppo-resume", Button).disabled = not active or job.status != "paused"
        if finished_now:
            self._finished(job)

    def _finished(self, job: Job) -> None:
        if job.status == "failed":
            self.notify(f"PPO failed: {job.error}", severity="error", timeout=12)
        elif job.status == "cancelled":
            self.notify(f"PPO stopped at iteration {job.step}; c continues it")
        else:
            self.notify(f"PPO session done: policy v{self.last_version} saved")

    def _progress(self, job: Job | None) -> None:
        bar = self.query_one("#ppo-progress", ProgressBar)
        if job is None or not job.total_steps:
            bar.update(total=None)
            return
        # Iterations count on across a resumed session: "iteration 7 of 10".
        bar.update(total=job.total_steps, progress=job.step)

    def status_text(self) -> str:
        job = self.job
        if job is None:
            return "No PPO session yet. Press s to start one (it trains the policy against the reward model)."
        head = f"PPO job {job.id} {job.status}"
        if job.status == "queued" or (job.status == "running" and not self.series):
            return f"{head}: loading the model, the reward and the reference; sampling the first batch"
        figures = self._latest_figures() + self._penalty_warning()
        if job.status == "paused":
            return f"{head} after iteration {job.step}{figures}. r resumes, e stops."
        if job.status == "running":
            return f"{head}: iteration {job.step}{figures}"
        if job.status == "failed":
            return f"{head}: {job.error or 'no reason recorded'}"
        version = f"; latest policy v{self.last_version}" if self.last_version else ""
        if job.status == "cancelled":
            return f"{head} after iteration {job.step}{version}. c continues it, s starts a new session."
        return f"{head} after iteration {job.step}{version}{figures}. s starts another session."

    def _latest(self) -> dict[str, float]:
        """Each metric's value at the latest iteration that logged it."""
        return {name: points[-1][1] for name, points in self.series.items() if points}

    def _latest_figures(self) -> str:
        latest = self._latest()
        parts = []
        if "objective/scores" in latest:  # its spread beside it: 0 ± 1 on a session's first batch
            spread = f" ± {latest['objective/scores_std']:.2g}" if "objective/scores_std" in latest else ""
            parts.append(f"score {latest['objective/scores']:.3g}{spread}")
        parts += [f"{label} {fmt.format(latest[name])}" for name, label, fmt in FIGURES if name in latest]
        return ("  ·  " + "  ·  ".join(parts)) if parts else ""

    def _penalty_warning(self) -> str:
        from rlhf.ppo import penalty_warning

        warning = penalty_warning(self._latest())
        return f"\nWARNING: {warning}" if warning else ""

    def _draw(self) -> None:
        for plot_id, title, name in PLOTS:
            widget = self.query_one(f"#{plot_id}", PlotextPlot)
            plt = widget.plt
            plt.clear_data()
            plt.title(title)
            points = self.series.get(name)
            if points:
                plt.plot([s for s, _ in points], [v for _, v in points], marker="braille")
            widget.refresh()
        # Reward against KL: how much score each nat of drift bought (over-optimization
        # shows as KL growing while the score flattens).
        widget = self.query_one("#plot-reward-kl", PlotextPlot)
        plt = widget.plt
        plt.clear_data()
        plt.title("score vs KL")
        kl, score = dict(self.series.get("objective/kl", [])), dict(self.series.get("objective/scores", []))
        steps = sorted(set(kl) & set(score))
        if steps:
            plt.scatter([kl[s] for s in steps], [score[s] for s in steps], marker="dot")
            plt.xlabel("KL")
        widget.refresh()

    def _fill_rollouts(self) -> None:
        table = self.query_one("#ppo-rollouts", DataTable)
        table.clear()
        for row in sorted(self.rollouts, key=lambda r: -r["score"]):
            table.add_row(one_line(row["prompt"], 40), one_line(row["completion"], 80),
                          f"{row['score']:.3f}", f"{row['kl']:.2f}")

    # -- actions

    def job_config(self, *, resume: bool = False) -> dict[str, Any]:
        """A PPO job config: the chosen options and the app's base model."""
        config: dict[str, Any] = {"iterations": self.query_one("#ppo-iterations", Select).value,
                                  "beta": self.query_one("#ppo-beta", Select).value,
                                  "adaptive_kl": self.query_one("#ppo-adaptive", Checkbox).value,
                                  "reward": self.query_one("#ppo-reward", Select).value or None,
                                  "resume": resume}
        return {**config, **self.wb.model_host.base_model(), **self.job_defaults}

    def action_start(self) -> None:
        self._begin(resume=False)

    def action_continue_session(self) -> None:
        self._begin(resume=True)

    def _begin(self, *, resume: bool) -> None:
        if self.job is not None and self.job.active:
            self.notify(f"PPO job {self.job.id} is still {self.job.status}: stop it first (e)",
                        severity="warning")
            return
        self._start(self.job_config(resume=resume))

    @work(thread=True, exclusive=True, group="ppo-start", exit_on_error=False)
    def _start(self, config: dict[str, Any]) -> None:
        from rlhf.ppo import PPOConfig, sampling_mismatch, session_settings, start_session

        PPOConfig.from_dict(config)
        job_id = start_session(self.wb.store, config)
        mismatch = sampling_mismatch(session_settings(self.wb.store, config), self.wb.store)
        what = "continuing the last session" if config.get("resume") else "started"
        self.app.call_from_thread(self.notify, f"PPO job {job_id} {what}")
        if mismatch:
            self.app.call_from_thread(self.notify, f"Warning: {mismatch}", severity="warning", timeout=12)
        self.app.call_from_thread(self.poll)

    def action_control(self, action: str) -> None:
        if self.job is None or not self.job.active:
            self.notify("no PPO session is running")
            return
        self._control(self.job.id, action)

    @work(thread=True, group="ppo-control", exit_on_error=False)
    def _control(self, job_id: int, action: str) -> None:
        from rlhf import jobs

        jobs.request(self.wb.store, job_id, action)
        said = {"pause": "pausing", "resume": "resuming", "cancel": "stopping"}[action]
        self.app.call_from_thread(self.notify, f"{said} PPO job {job_id} (between iterations)")
        self.app.call_from_thread(self.poll)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        actions = {"ppo-start": self.action_start, "ppo-pause": lambda: self.action_control("pause"),
                   "ppo-resume": lambda: self.action_control("resume"),
                   "ppo-stop": lambda: self.action_control("cancel")}
        if event.button.id in actions:
            actions[event.button.id]()
