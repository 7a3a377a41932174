"""`rlhf stats` (what the database holds) and `rlhf jobs` (background jobs:
status, why one failed, where its log is; `rlhf jobs metrics JOB` what one logged)."""

from __future__ import annotations

import argparse
import json
import sys

from rlhf.commands.common import open_db, say


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("jobs", help="background jobs (reward training, PPO): status, reason for a failure, log")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_jobs)
    actions = p.add_subparsers(dest="jobs_command", metavar="metrics | pause | resume | cancel")
    for action, about in (("pause", "pause a running job between steps"), ("resume", "resume a paused job"),
                          ("cancel", "stop a job between steps (what it saved stays)")):
        control = actions.add_parser(action, help=about)
        control.add_argument("job", type=int, help="job id (`rlhf jobs` lists them)")
        control.set_defaults(func=cmd_job_control, action=action)
    metrics = actions.add_parser(
        "metrics", help="a job's metrics, a row per step (also in TensorBoard when it is installed)")
    metrics.add_argument("job", type=int, help="job id (`rlhf jobs` lists them)")
    metrics.add_argument("--csv", action="store_true", help="comma-separated, for a spreadsheet or pandas")
    metrics.set_defaults(func=cmd_job_metrics)

    p = sub.add_parser("stats", help="counts of prompts, labels, pairs and versions")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_stats)


def cmd_stats(args: argparse.Namespace) -> int:
    from rlhf.jobs import refresh

    with open_db(args) as store:
        refresh(store)  # a killed job is not active, whatever its row last said
        stats = store.stats()
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    width = max(len(k) for k in stats)
    for key, value in stats.items():
        print(f"{key.replace('_', ' '):<{width}}  {value}")
    return 0


def cmd_job_control(args: argparse.Namespace) -> int:
    from rlhf.jobs import refresh, request

    with open_db(args) as store:
        refresh(store)  # a job whose process died is not told anything
        request(store, args.job, args.action)
    print(f"asked job {args.job} to {args.action} (it acts between steps)")
    return 0


def cmd_job_metrics(args: argparse.Namespace) -> int:
    from rlhf.job_metrics import board_dir, metrics_table, table_csv

    with open_db(args) as store:
        kind = store.job(args.job).kind
        header, rows = metrics_table(store, args.job)
        board = board_dir(store.path, args.job, kind)
    if args.csv:
        sys.stdout.write(table_csv(header, rows))
        return 0
    if not rows:
        print(f"job {args.job} logged no metrics yet")
        return 0
    cells = [header] + [[str(r[0])] + [f"{v:.4g}" if isinstance(v, float) else str(v) for v in r[1:]] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))
    if board.exists():
        say(f"TensorBoard: tensorboard --logdir {board.parent}")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from rlhf.jobs import log_path, refresh

    with open_db(args) as store:
        refresh(store)
        jobs = store.jobs()
        logs = {job.id: str(log_path(store.path, job.id)) for job in jobs}
    if args.json:
        fields = ("id", "kind", "status", "step", "total_steps", "started_at", "finished_at", "error")
        print(json.dumps([{**{k: getattr(job, k) for k in fields}, "log": logs[job.id]} for job in jobs], indent=2))
        return 0
    if not jobs:
        print("no jobs yet: `rlhf train-reward` and `rlhf ppo` start them")
        return 0
    for job in jobs:
        when = " to ".join(s[:19].replace("T", " ") for s in (job.started_at, job.finished_at) if s)
        print(f"job {job.id}  {job.kind:<6}  {job.status:<9}  step {job.step}/{job.total_steps or '?'}"
              f"  {when or 'not started'}")
        if job.error:
            print(f"    reason: {job.error}")
        print(f"    log: {logs[job.id]}")
    return 0
