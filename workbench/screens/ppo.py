"""The PPO screen: start, pause, resume and stop a PPO session; watch score, KL,
beta, entropy and clip fraction live, reward against KL, and the rollouts of
every iteration, browsed with [ and ] and sorted by score, KL or length (o).

The session runs in its own process (rlhf.jobs, runner rlhf.ppo:run_job);
following it is the JobScreen's (workbench/screens/job_screen.py). This screen
adds the session's settings, its plots, and the rollouts the job keeps in the
store after each iteration (rlhf.rollout_archive).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal
from textual.widgets import Button, Checkbox, DataTable, Label, ProgressBar, Select, Static
from textual_plotext import PlotextPlot

from rlhf.ppo_config import DEFAULT_ITERATIONS, PPOConfig
from rlhf.rows import Checkpoint, Job, RolloutRow
from rlhf.store import ROLLOUT_SORTS, Store
from workbench.job_follow import Series
from workbench.messages import RolloutsQueued
from workbench.screens.job_screen import JobScreen, JobSnapshot, choices
from workbench.widgets.text import one_line

# (metric, label, format) of the latest iteration in the status line, after the score.
FIGURES = (("objective/kl", "KL", "{:.3g}"), ("beta", "beta", "{:.3g}"), ("val/ratio", "ratio", "{:.3g}"),
           ("val/eos_fraction", "EOS", "{:.0%}"), ("val/completion_tokens", "length", "{:.0f}"),
           ("val/score_length_corr", "score~length r", "{:+.2f}"), ("reward/spread", "RM spread", "{:.2f}"))
# (plot id, title, metric) for the plots over iterations.
PLOTS = (("plot-score", "score", "objective/scores"), ("plot-kl", "KL (nats/seq)", "objective/kl"),
         ("plot-beta", "beta", "beta"), ("plot-entropy", "entropy", "objective/entropy"),
         ("plot-clipfrac", "clip fraction", "policy/clipfrac"),
         # Length, the first suspect of a hacked reward (Singhal et al. 2023), and
         # how many answers finished: TRL's val/num_eos_tokens, as a fraction.
         ("plot-length", "mean length (tokens)", "val/completion_tokens"),
         ("plot-eos", "ended with EOS", "val/eos_fraction"))
# Drawn over a plot: (plot id, metric, label). The reward ensemble's disagreement
# beside the score: rising, the policy has left what the labels cover (Coste et al. 2023).
OVERLAYS = (("plot-score", "reward/spread", "RM spread"),)
# The screen's settings start at the session defaults (rlhf.ppo_config).
DEFAULT = PPOConfig()
ROLLOUT_COLUMNS = ("prompt", "completion", "score", "KL", "length", "end")
# The rollouts table's orders, cycled by o: highest first by each, then as sampled.
SORTS: tuple[str | None, ...] = (*ROLLOUT_SORTS, None)
REWARD_CHOICES = (("reward model", ""), ("rule: short+EOS", "rule:short"), ("rule: distinct", "rule:distinct"))
ALGORITHM_CHOICES = (("PPO", "ppo"), ("RLOO", "rloo"))
# The KL budget, nats per answer (rlhf.ppo_config.PPOConfig.kl_budget); Select values cannot be None.
BUDGET_OFF = 0.0
KL_BUDGETS = [("off", BUDGET_OFF), ("5", 5.0), ("10", 10.0), ("20", 20.0)]


def budget_text(last: Checkpoint) -> str:
    """How a session that hit its KL budget ended, from the version it marked past it."""
    budget = last.meta.get("over_kl_budget")
    if budget is None:
        return ""
    return (f"its KL passed the budget of {budget:g} nats at v{last.version} ({last.meta.get('own_kl', 0):.1f}); "
            f"v{last.parent_version} is the last version within it")


@dataclass
class Snapshot(JobSnapshot):
    """What one poll read from the store."""

    rollouts: list[RolloutRow] | None = None   # of ``iteration``; None: not read this time
    iteration: int | None = None               # the iteration shown
    iterations: tuple[int, ...] = ()           # those kept
    last_version: int | None = None
    budget_text: str = ""                      # how the KL budget ended the session, if it did


class PPOScreen(JobScreen[Snapshot]):
    BINDINGS = [
        Binding("s", "start", "Start", tooltip="Start a PPO session from the latest policy"),
        Binding("c", "continue_session", "Continue", tooltip="Resume a stopped session from its last checkpoint"),
        Binding("p", "control('pause')", "Pause", tooltip="Pause the session after the current iteration"),
        Binding("r", "control('resume')", "Resume", tooltip="Resume a paused session"),
        Binding("e", "control('cancel')", "Stop", tooltip="Stop the session after the current iteration"),
        Binding("left_square_bracket", "browse(-1)", "Earlier", key_display="[",
                tooltip="Rollouts of the iteration before"),
        Binding("right_square_bracket", "browse(1)", "Later", key_display="]",
                tooltip="Rollouts of the iteration after (the latest follows the session)"),
        Binding("o", "cycle_sort", "Sort", tooltip="Sort the rollouts by score, KL, length, or as sampled"),
        Binding("q", "queue_rollouts", "Label these",
                tooltip="Queue the shown iteration's answers for labeling (K a prompt) and sample from its version"),
    ]

    KIND = "ppo"
    IDLE = "no PPO session is running"
    BUSY = "PPO job {job.id} is still {job.status}: stop it first (e)"
    REQUESTED = {action: f"{doing} PPO job {{id}} (between iterations)"
                 for action, doing in (("pause", "pausing"), ("resume", "resuming"), ("cancel", "stopping"))}

    def __init__(self, job_defaults: Mapping[str, Any] | None = None) -> None:
        super().__init__(job_defaults)
        self.rollouts: list[RolloutRow] = []
        self.last_version: int | None = None
        self.budget_text = ""
        self.browsing: int | None = None   # the iteration asked for; None follows the latest
        self.sort: str | None = SORTS[0]
        self.iteration: int | None = None  # the iteration shown
        self.iterations: tuple[int, ...] = ()
        self._reread = False               # browsing or sorting asks the next poll for rollouts

    def compose_body(self) -> ComposeResult:
        yield Static("", id="ppo-status", markup=False)
        with Horizontal(id="ppo-controls"):
            yield Label("iter.", classes="ppo-label")
            yield Select(choices(5, DEFAULT_ITERATIONS, 20, 50), value=DEFAULT_ITERATIONS, allow_blank=False,
                         id="ppo-iterations")
            yield Label("beta", classes="ppo-label")
            yield Select(choices(0.01, 0.02, DEFAULT.beta, 0.1), value=DEFAULT.beta, allow_blank=False,
                         id="ppo-beta")
            yield Checkbox("adaptive", DEFAULT.adaptive_kl, id="ppo-adaptive",
                           tooltip="adapt beta towards the target KL (lm-human-preferences' controller)")
            yield Label("KL ≤", classes="ppo-label")
            yield Select(KL_BUDGETS, value=BUDGET_OFF, allow_blank=False, id="ppo-kl-budget",
                         tooltip="end the session when a batch's KL to the reference passes this many nats")
            yield Select(list(REWARD_CHOICES), value="", allow_blank=False, id="ppo-reward")
            yield Select(list(ALGORITHM_CHOICES), value=DEFAULT.algorithm, allow_blank=False, id="ppo-algorithm",
                         tooltip="PPO: GAE with a value head; RLOO: each answer against the other answers to its "
                                 f"prompt ({DEFAULT.rloo_k} a prompt)")
            yield Button("Start", id="ppo-start", variant="primary")
            yield Button("Pause", id="ppo-pause")
            yield Button("Resume", id="ppo-resume")
            yield Button("Stop", id="ppo-stop", variant="error")
        yield ProgressBar(total=None, show_eta=True, id="ppo-progress")
        with Grid(id="ppo-plots"):
            for plot_id, _, _ in PLOTS:
                yield PlotextPlot(id=plot_id)
            yield PlotextPlot(id="plot-reward-kl")
        yield Static("", id="ppo-rollouts-title", markup=False)
        yield DataTable(id="ppo-rollouts", zebra_stripes=True, cursor_type="row")

    def on_mount(self) -> None:  # before JobScreen.on_mount (Textual calls both, this first)
        table = self.query_one("#ppo-rollouts", DataTable)
        for name in ROLLOUT_COLUMNS:
            table.add_column(name, key=name)

    # -- the session as this screen shows it

    def read(self, store: Store, job: Job | None, new_metrics: Series, first_read: bool) -> Snapshot:
        last = store.checkpoint("policy")
        snap = Snapshot(job, new_metrics, last_version=last.version if last else None,
                        budget_text=budget_text(last) if last is not None and job is not None
                        and last.job_id == job.id else "")
        # The job keeps each iteration's batch as it ends; browsing asks for another.
        if job is not None and (new_metrics or first_read or self._reread):
            self._reread = False
            snap.iterations = tuple(store.rollout_iterations(job.id))
            if snap.iterations:
                wanted = self.browsing
                snap.iteration = wanted if wanted in snap.iterations else snap.iterations[-1]
                snap.rollouts = store.rollouts(job.id, snap.iteration, sort=self.sort)
            else:
                snap.rollouts = []
        return snap

    def new_job(self) -> None:
        self.rollouts, self.browsing, self.iteration, self.iterations = [], None, None, ()

    def show(self, snap: Snapshot) -> None:
        job = snap.job
        self.last_version, self.budget_text = snap.last_version, snap.budget_text
        if snap.rollouts is not None:
            self.iteration, self.iterations = snap.iteration, snap.iterations
            if snap.rollouts != self.rollouts:
                self.rollouts = snap.rollouts
                self._fill_rollouts()
            self.query_one("#ppo-rollouts-title", Static).update(self.rollouts_title())
        self.query_one("#ppo-status", Static).update(self.status_text())
        active = job is not None and job.active
        self.query_one("#ppo-start", Button).disabled = active
        self.query_one("#ppo-stop", Button).disabled = not active
        self.query_one("#ppo-pause", Button).disabled = not active or job.status == "paused"
        self.query_one("#ppo-resume", Button).disabled = not active or job.status != "paused"

    def finished(self, job: Job, snap: Snapshot) -> None:
        if job.status == "failed":
            self.notify(f"PPO failed: {job.error}", severity="error", timeout=12)
        elif job.status == "cancelled":
            self.notify(f"PPO stopped at iteration {job.step}; c continues it")
        elif self.budget_text:
            self.notify(f"PPO session done: {self.budget_text}", timeout=10)
        else:
            self.notify(f"PPO session done: policy v{self.last_version} saved")

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
        if self.budget_text:
            version = f"; {self.budget_text}"
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
        from rlhf.ppo_session import penalty_warning

        warning = penalty_warning(self._latest())
        return f"\nWARNING: {warning}" if warning else ""

    def draw(self) -> None:
        for plot_id, title, name in PLOTS:
            widget = self.query_one(f"#{plot_id}", PlotextPlot)
            plt = widget.plt
            plt.clear_data()
            plt.title(title)
            points = self.series.get(name)
            overlay = [(self.series.get(metric), label) for where, metric, label in OVERLAYS if where == plot_id]
            drawn = [(points, title)] + [(p, label) for p, label in overlay if p]
            for series, label in drawn:
                if series:
                    plt.plot([s for s, _ in series], [v for _, v in series], marker="braille",
                             label=label if len(drawn) > 1 else None)
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

    def action_queue_rollouts(self) -> None:
        """Label what the policy produces now: the shown iteration's rollouts go to the labeling queue."""
        if self.job is None or self.iteration is None:
            self.notify("no rollouts to queue yet: start a session (s)", severity="warning")
            return
        if not self.wb.model_host.ready:
            self.notify("the model is still loading: queue the rollouts once it is ready", severity="warning")
            return
        self.notify(f"queueing the rollouts of iteration {self.iteration} for labeling…")
        self.wb.model_host.queue_rollouts(self, self.job.id, self.iteration)

    def on_rollouts_queued(self, message: RolloutsQueued) -> None:
        self.notify(f"{message.sets} sets of policy v{message.version} wait on the Label screen (F1)"
                    + (f"; {message.sampled} answers sampled to make {self.wb.k} a prompt" if message.sampled else "")
                    + f"; labeling samples from v{message.version} now", timeout=8)

    def _fill_rollouts(self) -> None:
        table = self.query_one("#ppo-rollouts", DataTable)
        table.clear()
        for row in self.rollouts:
            table.add_row(one_line(row.prompt, 40), one_line(row.completion, 80), f"{row.score:.3f}",
                          f"{row.kl:.2f}", str(row.n_tokens), row.finish_reason)

    def rollouts_title(self) -> str:
        if self.iteration is None:
            return "Rollouts: each iteration's batch is kept here as the session runs."
        first, last = self.iterations[0], self.iterations[-1]
        kept = f"iteration {first}" if first == last else f"iterations {first}-{last}"
        order = f"highest {self.sort} first" if self.sort else "as sampled"
        following = " (the latest)" if self.browsing is None else ""
        return (f"Rollouts of iteration {self.iteration}{following} · {len(self.rollouts)} answers, {order} · "
                f"kept: {kept} · [ ] browse · o sorts · q labels them")

    # -- actions

    def job_config(self, *, resume: bool = False) -> dict[str, Any]:
        """A PPO job config: the chosen options and the app's base model. A
        continued session keeps its own estimator (its value head or its groups)."""
        budget = self.query_one("#ppo-kl-budget", Select).value
        settings = {"beta": self.query_one("#ppo-beta", Select).value,
                    "adaptive_kl": self.query_one("#ppo-adaptive", Checkbox).value,
                    "kl_budget": budget or None}
        if not resume:
            settings["algorithm"] = self.query_one("#ppo-algorithm", Select).value
        return self.full_config({"iterations": self.query_one("#ppo-iterations", Select).value,
                                 "reward": self.query_one("#ppo-reward", Select).value or None,
                                 "resume": resume, "ppo": settings})

    def action_start(self) -> None:
        self.start(self.job_config(resume=False))

    def action_continue_session(self) -> None:
        self.start(self.job_config(resume=True))

    def launch(self, config: dict[str, Any]) -> None:
        from rlhf.ppo import sampling_mismatch, session_settings, start_session
        from rlhf.ppo_config import PPOJob

        job = PPOJob.from_dict(config)
        job_id = start_session(self.wb.store, job)
        mismatch = sampling_mismatch(session_settings(self.wb.store, job), self.wb.store)
        self.notify(f"PPO job {job_id} {'continuing the last session' if job.resume else 'started'}")
        if mismatch:
            self.notify(f"Warning: {mismatch}", severity="warning", timeout=12)

    def action_control(self, action: str) -> None:
        self.request(action)

    def action_browse(self, step: int) -> None:
        """Show the rollouts of an earlier or later iteration; past the latest,
        follow the session again."""
        if not self.iterations or self.iteration is None:
            self.notify("no rollouts kept yet: they come with each iteration")
            return
        at = self.iterations.index(self.iteration) + step
        if at < 0:
            self.notify(f"iteration {self.iterations[0]} is the first kept")
            return
        self.browsing = self.iterations[at] if at < len(self.iterations) - 1 else None
        self._reread = True
        self.poll()

    def action_cycle_sort(self) -> None:
        self.sort = SORTS[(SORTS.index(self.sort) + 1) % len(SORTS)]
        self._reread = True
        self.poll()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        actions = {"ppo-start": self.action_start, "ppo-pause": lambda: self.action_control("pause"),
                   "ppo-resume": lambda: self.action_control("resume"),
                   "ppo-stop": lambda: self.action_control("cancel")}
        if event.button.id in actions:
            actions[event.button.id]()
