"""Background jobs: training runs in a separate process, talking through the store.

A job is a row in the ``jobs`` table. ``start_job`` queues it and spawns
``python -m rlhf.jobs DB JOB_ID``; the child loads its runner (reward training,
PPO, ...), writes status, metrics and checkpoints to the store, and polls the
row's ``control`` column between steps for pause / resume / cancel requests.
A separate process, not a thread: a crash or an out-of-memory kill in training
must not take the app (or a label) down with it.

A job whose process disappears (``kill -9``, OOM killer, a crash in C code) is
marked ``failed`` with that reason the next time anyone looks (``refresh``).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from rlhf.database import now
from rlhf.errors import UserError
from rlhf.job_metrics import Board, board_dir
from rlhf.locations import checkpoints_dir
from rlhf.rows import Job
from rlhf.store import Store

# kind -> "module:function" taking a JobContext; imported only in the child.
RUNNERS: dict[str, str] = {
    "reward": "rlhf.reward:run_job",
    "ppo": "rlhf.ppo:run_job",
    "dpo": "rlhf.dpo:run_job",
}
POLL_S = 0.5


class JobCancelled(Exception):
    """Raised inside a runner when the job was asked to stop."""


@dataclass
class JobContext:
    """What a runner gets: the store, its job row's id and config, and the means
    to report progress and honour pause / cancel between steps."""

    store: Store
    job_id: int
    config: dict[str, Any]
    db_path: Path
    board: Board | None = None  # TensorBoard event files, when tensorboard is installed
    _paused_s: float = field(default=0.0, repr=False)

    @property
    def checkpoint_root(self) -> Path:
        return checkpoints_dir(self.db_path)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record one step's metrics (also the job's heartbeat and step counter)."""
        self.store.log_metrics(self.job_id, step, metrics)
        if self.board is not None:
            self.board.log(step, metrics)

    def set_total(self, total_steps: int) -> None:
        self.store.update_job(self.job_id, total_steps=total_steps)

    def checkpoint(self) -> None:
        """Call between steps: raises JobCancelled on cancel, blocks while paused."""
        control = self.store.job(self.job_id).control
        if control == "cancel":
            raise JobCancelled()
        if control != "pause":
            return
        self.store.update_job(self.job_id, status="paused")
        while True:
            time.sleep(POLL_S)
            control = self.store.job(self.job_id).control
            if control == "cancel":
                raise JobCancelled()
            if control != "pause":
                self.store.update_job(self.job_id, status="running", heartbeat_at=now())
                return


# --- liveness: whoever looks next marks a job whose process died ---------------


def process_alive(job: Job) -> bool:
    """Is the job's process still there (and still ours, not a reused pid)?"""
    pid = job.pid
    if not pid:
        # Queued but not yet started: give the child a moment to write its pid.
        return time.time() - _epoch(job.created_at) < 60
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return any("rlhf.jobs" in part for part in proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _epoch(stamp: str) -> float:
    from datetime import datetime

    try:
        return datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return 0.0


def died_message(job: Job) -> str:
    return (f"process {job.pid} ended without finishing (crashed, killed or out of memory); "
            f"last step {job.step}")


def refresh(store: Store) -> list[int]:
    """Mark active jobs whose process died as failed; returns their ids."""
    dead = {job.id: died_message(job) for job in store.jobs(active=True) if not process_alive(job)}
    store.fail_active_jobs(dead)
    return list(dead)


# --- the parent's side ---------------------------------------------------------


def start_job(store: Store, kind: str, config: dict[str, Any], *, total_steps: int | None = None) -> int:
    """Queue a job and start its process. Refuses while another job is active."""
    if kind not in RUNNERS:
        raise UserError(f"unknown job kind {kind!r}: one of {', '.join(RUNNERS)}")
    refresh(store)  # a job whose process died does not block the next one
    job_id = store.create_job(kind, config, total_steps=total_steps)
    with open(log_path(store.path, job_id), "ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rlhf.jobs", str(store.path), str(job_id)],
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # outlives the app; Ctrl-C in the app does not kill it
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    store.update_job(job_id, pid=proc.pid)
    return job_id


def log_path(db_path: Path, job_id: int) -> Path:
    """Where a job's output goes (its traceback, when it crashed)."""
    return checkpoints_dir(db_path) / f"job-{job_id}.log"


def request(store: Store, job_id: int, action: str) -> None:
    """Ask a running job to 'pause', 'resume' or 'cancel' (it acts between steps)."""
    job = store.job(job_id)
    if not job.active:
        raise UserError(f"job {job_id} is {job.status}; only a queued, running or paused job can be told to {action}")
    control = {"pause": "pause", "resume": None, "cancel": "cancel"}
    if action not in control:
        raise UserError(f"unknown job action {action!r}: pause, resume or cancel")
    store.update_job(job_id, control=control[action])


def wait(store: Store, job_id: int, timeout_s: float = 600.0,
         on_poll: Callable[[Job], None] | None = None) -> Job:
    """Block until the job ends (or its process dies); returns the final row."""
    deadline = time.monotonic() + timeout_s
    while True:
        refresh(store)
        job = store.job(job_id)
        if on_poll:
            on_poll(job)
        if not job.active:
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job.status} after {timeout_s:.0f} s")
        time.sleep(POLL_S)


def follow(store: Store, job_id: int, on_step: Callable[[Job, int, dict[str, float]], None],
           timeout_s: float = float("inf")) -> Job:
    """Block until the job ends, calling ``on_step(job, step, metrics)`` once per
    newly logged step, in order (a runner logs each step's metrics in one
    transaction, so a step is never seen half written); returns the final row."""
    shown = -1

    def on_poll(job: Job) -> None:
        nonlocal shown
        by_step: dict[int, dict[str, float]] = {}
        for name, values in store.metrics(job_id, after_step=shown).items():
            for step, value in values:
                by_step.setdefault(step, {})[name] = value
        for step in sorted(by_step):
            on_step(job, step, by_step[step])
            shown = step

    return wait(store, job_id, timeout_s=timeout_s, on_poll=on_poll)


def latest_job(store: Store, kind: str) -> Job | None:
    """The job of a kind a screen should show: the active one, else the most recent."""
    of_kind = store.jobs(kind)
    active = [j for j in of_kind if j.active]
    return active[-1] if active else (of_kind[-1] if of_kind else None)


def active_job(store: Store) -> Job | None:
    refresh(store)
    active = store.jobs(active=True)
    return active[-1] if active else None


# --- the child's side ------------------------------------------------------------


def _runner(kind: str) -> Callable[[JobContext], None]:
    module, func = RUNNERS[kind].split(":")
    return getattr(importlib.import_module(module), func)


def run(db_path: Path, job_id: int) -> int:
    """Run one job to its end in this process; returns the exit code."""
    store = Store(db_path, create=False)  # a job never starts a database of its own
    job = store.job(job_id)
    store.update_job(job_id, status="running", pid=os.getpid(), started_at=now(), heartbeat_at=now())
    ctx = JobContext(store=store, job_id=job_id, config=job.config, db_path=Path(db_path),
                     board=Board(board_dir(Path(db_path), job_id, job.kind)))
    try:
        _runner(job.kind)(ctx)
    except JobCancelled:
        store.update_job(job_id, status="cancelled", finished_at=now(), control=None)
        return 0
    except UserError as e:
        store.update_job(job_id, status="failed", error=str(e), finished_at=now())
        return 1
    except BaseException as e:  # a bug or an environment failure: keep the traceback in the log
        traceback.print_exc()
        first = str(e).splitlines()[0] if str(e) else ""
        store.update_job(job_id, status="failed", error=f"{type(e).__name__}: {first}"[:500],
                         finished_at=now())
        return 1
    finally:
        ctx.board.close()
    store.update_job(job_id, status="done", finished_at=now(), control=None)
    return 0


# A job runs below the workbench's priority: on two cores a training job and the
# app's sampling otherwise take the event loop's turn, and a key press waits for
# them (benchmarks/app.py). Alone on the machine a niced job loses nothing.
JOB_NICENESS = 10


if __name__ == "__main__":
    if hasattr(os, "nice"):
        os.nice(JOB_NICENESS)
    sys.exit(run(Path(sys.argv[1]), int(sys.argv[2])))
