"""What the Train and PPO screens share: following one kind of background job.

The job runs in its own process (rlhf.jobs); the screen only reads the store.
A timer starts a worker thread that reads the latest job of the screen's kind,
the metric rows added since the last read and whatever else the screen shows
(``read``), and hands them to the event loop, which merges the new points
(workbench/job_follow.py), redraws, moves the progress bar and says when the
job has ended. Starting, pausing and stopping go through the store as well.
Nothing here waits on training, so labeling can go on in another mode.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from textual import work
from textual.widgets import Button, ProgressBar

from rlhf.rows import Job
from rlhf.store import Store
from workbench.job_follow import Series, just_finished, merge_new_points
from workbench.screens.base import WorkbenchScreen

POLL_S = 1.0


def choices(*values: float) -> list[tuple[str, float]]:
    """Select options for these values (a job setting's default among them), once each, in order."""
    return [(f"{v:g}", v) for v in sorted(set(values))]


@dataclass
class JobSnapshot:
    """What one poll read from the store; a screen's snapshot adds what else it shows."""

    job: Job | None
    new_metrics: Series = field(default_factory=dict)


Snap = TypeVar("Snap", bound=JobSnapshot)


class JobScreen(WorkbenchScreen, Generic[Snap]):
    """A screen that starts and follows jobs of one kind. Its body holds one
    ProgressBar; a subclass draws ``series`` (``draw``), shows a snapshot
    (``show``), says how a job ended (``finished``) and starts one (``launch``)."""

    KIND: ClassVar[str]                    # the rlhf.jobs kind followed
    FIRST_STEP: ClassVar[int] = 0          # a new job's metrics are read after this step
    IDLE: ClassVar[str]                    # said when there is no job to pause or stop
    BUSY: ClassVar[str]                    # said when a job is asked for while one runs: "{job}" is it
    REQUESTED: ClassVar[dict[str, str]]    # said once a request reached a job, per action: "{id}" is its id

    def __init__(self, job_defaults: Mapping[str, Any] | None = None) -> None:
        """``job_defaults``: config over what the screen chooses, read each time
        a job starts (tests make the jobs tiny)."""
        super().__init__()
        self.job_defaults: Mapping[str, Any] = job_defaults if job_defaults is not None else {}
        self.job_id: int | None = None      # the job the plots show
        self.job: Job | None = None
        self.last_step = self.FIRST_STEP    # metrics read up to this step
        self.series: Series = {}

    def on_mount(self) -> None:
        self.draw()
        self.poll()
        self.set_interval(POLL_S, self.poll)

    def on_screen_resume(self) -> None:
        self.poll()

    # -- what a screen fills in

    def read(self, store: Store, job: Job | None, new_metrics: Series, first_read: bool) -> Snap:
        """In the poll worker: the snapshot of ``job`` (``first_read``: its first
        read on this screen) with whatever else the screen shows."""
        raise NotImplementedError

    def new_job(self) -> None:
        """A newer job is followed from now on: forget what the last one showed
        beyond its series."""

    def draw(self) -> None:
        """Redraw the plots from ``series``."""

    def show(self, snap: Snap) -> None:
        """Show a snapshot beyond the plots and the progress bar: status line, buttons."""

    def finished(self, job: Job, snap: Snap) -> None:
        """Say how a job ended (it was active at the poll before)."""

    def launch(self, config: dict[str, Any]) -> None:
        """In a worker: check ``config`` and start a job with it (rlhf.jobs)."""
        raise NotImplementedError

    # -- reading the store (in a worker)

    def poll(self) -> None:
        self._read_store()

    @work(thread=True, exclusive=True, group="job-poll", exit_on_error=False)
    def _read_store(self) -> None:
        from rlhf import jobs

        store = self.wb.store
        job_id, after = self.job_id, self.last_step
        if self.job is not None and self.job.active:
            jobs.refresh(store)  # a killed job shows as failed
        latest = jobs.latest_job(store, self.KIND)
        if latest is not None and latest.id != job_id:
            job_id, after = latest.id, self.FIRST_STEP
        new_metrics = store.metrics(job_id, after_step=after) if job_id is not None else {}
        snap = self.read(store, latest, new_metrics, first_read=after == self.FIRST_STEP)
        self.app.call_from_thread(self._apply, snap)

    # -- showing it (on the event loop)

    def _apply(self, snap: Snap) -> None:
        job = snap.job
        if job is not None and job.id != self.job_id:
            self.job_id, self.last_step, self.series = job.id, self.FIRST_STEP, {}
            self.new_job()
        finished_now = just_finished(self.job, job)
        self.job = job
        last_step = merge_new_points(self.series, snap.new_metrics, self.last_step)
        if last_step is not None:
            self.last_step = last_step
            self.draw()
        self._progress(job)
        self.show(snap)
        if finished_now:
            assert job is not None
            self.finished(job, snap)

    def _progress(self, job: Job | None) -> None:
        bar = self.query_one(ProgressBar)
        if job is None or not job.total_steps:
            bar.update(total=None)
            return
        # Steps count on across a resumed job: "iteration 7 of 10".
        bar.update(total=job.total_steps, progress=job.step)

    # -- starting and steering a job

    def full_config(self, options: dict[str, Any]) -> dict[str, Any]:
        """A job config, shaped as the job's row holds it: the options chosen on
        screen, the app's base model, and the screen's job defaults over both
        (a nested settings dict is merged key by key)."""
        config = {**options, "model": asdict(self.wb.model_host.base_model())}
        for key, value in self.job_defaults.items():
            both = isinstance(value, Mapping) and isinstance(config.get(key), Mapping)
            config[key] = {**config[key], **value} if both else value
        return config

    def start(self, config: dict[str, Any]) -> None:
        if self.job is not None and self.job.active:
            self.notify(self.BUSY.format(job=self.job), severity="warning")
            return
        self._start(config)

    @work(thread=True, exclusive=True, group="job-start", exit_on_error=False)
    def _start(self, config: dict[str, Any]) -> None:
        self.launch(config)
        self.app.call_from_thread(self.poll)

    def request(self, action: str) -> None:
        """Ask the running job to pause, resume or cancel (between its steps)."""
        if self.job is None or not self.job.active:
            self.notify(self.IDLE)
            return
        self._request(self.job.id, action)

    @work(thread=True, group="job-control", exit_on_error=False)
    def _request(self, job_id: int, action: str) -> None:
        from rlhf import jobs

        jobs.request(self.wb.store, job_id, action)
        self.notify(self.REQUESTED[action].format(id=job_id))
        self.app.call_from_thread(self.poll)


class StartCancelScreen(JobScreen[Snap]):
    """A job screen whose job is started and cancelled (keys s, c and the buttons
    ``#{PREFIX}-start`` and ``#{PREFIX}-cancel``): the Train and DPO screens."""

    PREFIX: ClassVar[str]

    def job_config(self) -> dict[str, Any]:
        """The config of a job started now, from the screen's controls."""
        raise NotImplementedError

    def action_start(self) -> None:
        self.start(self.job_config())

    def action_cancel(self) -> None:
        self.request("cancel")

    def show_buttons(self, job: Job | None) -> None:
        """Start while no job runs, Cancel while one does."""
        self.query_one(f"#{self.PREFIX}-cancel", Button).disabled = job is None or not job.active
        self.query_one(f"#{self.PREFIX}-start", Button).disabled = job is not None and job.active

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == f"{self.PREFIX}-start":
            self.action_start()
        elif event.button.id == f"{self.PREFIX}-cancel":
            self.action_cancel()
