"""A job's metrics leave the store where researchers read them: TensorBoard event
files under the names a TRL run has, and a plain table (`rlhf jobs metrics`)."""

from __future__ import annotations

import csv
import io
import sys

import pytest

from rlhf import jobs
from rlhf.cli import main
from rlhf.job_metrics import Board, board_dir

LOGGED = {1: {"objective/kl": 0.0, "objective/scores": -0.25},
          2: {"objective/kl": 0.75, "objective/scores": 0.5, "eval/accuracy": 0.625},
          3: {"objective/kl": 1.5, "objective/scores": 1.25}}


def _run_job_that_logs(store, db_path, monkeypatch) -> int:
    """A job whose runner logs LOGGED, run to its end in this process."""
    def runner(ctx):
        for step, metrics in LOGGED.items():
            ctx.log(step, metrics)

    monkeypatch.setattr(jobs, "_runner", lambda kind: runner)
    job_id = store.create_job("ppo", {})
    assert jobs.run(db_path, job_id) == 0
    return job_id


def test_job_metrics_reach_tensorboard_under_trls_names(store, db_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    job_id = _run_job_that_logs(store, db_path, monkeypatch)
    events = EventAccumulator(str(board_dir(db_path, job_id, "ppo"))).Reload()
    assert set(events.Tags()["scalars"]) == {"train/objective/kl", "train/objective/scores", "eval/accuracy"}
    for tag, name in (("train/objective/kl", "objective/kl"), ("eval/accuracy", "eval/accuracy")):
        board = [(e.step, pytest.approx(e.value)) for e in events.Scalars(tag)]
        assert board == store.metrics(job_id)[name]


def test_without_tensorboard_a_job_logs_to_the_store_alone(store, db_path, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    assert not Board(tmp_path / "board").available
    job_id = _run_job_that_logs(store, db_path, monkeypatch)
    assert store.job(job_id).status == "done"
    assert store.metrics(job_id)["objective/kl"] == [(1, 0.0), (2, 0.75), (3, 1.5)]


def test_jobs_metrics_prints_a_row_per_step(store, db_path, monkeypatch, capsys):
    job_id = _run_job_that_logs(store, db_path, monkeypatch)
    db = ["--db", str(db_path)]
    assert main([*db, "jobs", "metrics", str(job_id), "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert [r["eval/accuracy"] for r in rows] == ["", "0.625", ""]  # logged at step 2 only
    for row in rows:
        for name, value in LOGGED[int(row["step"])].items():
            assert float(row[name]) == value
    assert main([*db, "jobs", "metrics", str(job_id)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["step", "eval/accuracy", "objective/kl", "objective/scores"]
    assert lines[2].split() == ["2", "0.625", "0.75", "0.5"]
    assert main([*db, "jobs", "metrics", "99"]) == 2
    assert "no job with id 99" in capsys.readouterr().err
    assert main([*db, "jobs"]) == 0  # the plain listing is still there
    assert f"job {job_id}" in capsys.readouterr().out
