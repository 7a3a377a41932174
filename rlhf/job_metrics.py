"""A job's metrics where researchers read them: TensorBoard event files beside
the job's log, written as the job logs (when the optional ``tensorboard``
package is installed), and a plain step-by-metric table (``rlhf jobs metrics``).

TensorBoard names follow what a TRL run shows, so a workbench run sits beside
one in the same board: transformers' TensorBoard callback writes a trainer's
logs under ``train/`` (``train/objective/kl``, ``train/loss``) and its
evaluation under ``eval/`` (``rewrite_logs`` in transformers.integrations).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from rlhf.locations import checkpoints_dir
from rlhf.store import Store

BOARD_DIR = "tensorboard"


def board_dir(db_path: Path, job_id: int, kind: str) -> Path:
    """Where a job's event files go: ``tensorboard --logdir <db>-checkpoints/tensorboard``
    shows every job of a database, one run each."""
    return checkpoints_dir(db_path) / BOARD_DIR / f"job-{job_id}-{kind}"


def board_name(metric: str) -> str:
    """The TensorBoard tag of a workbench metric: as transformers' callback names a TRL run's."""
    return metric if metric.startswith(("eval/", "train/")) else f"train/{metric}"


class Board:
    """Event files of one job, when ``tensorboard`` is installed; otherwise nothing
    (``available`` says which): the store stays the record either way."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._writer: Any = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # the optional dependency is absent: no board, nothing lost
            return
        self._writer = SummaryWriter(log_dir=str(folder))

    @property
    def available(self) -> bool:
        return self._writer is not None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self._writer is None:
            return
        for name, value in metrics.items():
            if math.isfinite(value):
                self._writer.add_scalar(board_name(name), value, step)
        self._writer.flush()  # jobs log every few seconds at most: keep the board live

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def metrics_table(store: Store, job_id: int) -> tuple[list[str], list[list[Any]]]:
    """A job's metrics as a table: the header (step, then each metric by name)
    and a row per step, empty where a metric was not logged at that step."""
    store.job(job_id)  # a job that is not there is one clear line
    series = store.metrics(job_id)
    names = sorted(series)
    by_step: dict[int, dict[str, float]] = {}
    for name, points in series.items():
        for step, value in points:
            by_step.setdefault(step, {})[name] = value
    rows = [[step, *(by_step[step].get(n, "") for n in names)] for step in sorted(by_step)]
    return ["step", *names], rows


def table_csv(header: list[str], rows: list[list[Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()
