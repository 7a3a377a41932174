"""`rlhf train-reward` and `rlhf eval-reward`: the reward model from the command line.

Training runs as a background job (the same one the app's Train screen starts);
by default this command follows it and prints a line per logged step. Torch and
the engine are imported inside the handlers so `rlhf --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from rlhf.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    from rlhf.cli import add_model_options

    p = sub.add_parser("train-reward", help="train a reward model on the recorded pairs (a background job)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=None, help="passes over the pairs (default 1: more overfits)")
    length.add_argument("--steps", type=int, default=None, help="optimizer steps instead of whole epochs")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate, decaying linearly to 0 (default 1e-4)")
    p.add_argument("--batch-size", type=int, default=None, help="comparisons per forward pass (default 4)")
    p.add_argument("--accum", type=int, default=None, help="forward passes per optimizer step (default 2)")
    p.add_argument("--sources", choices=("all", "label", "import"), default=None,
                   help="train on labeled pairs, imported pairs, or all (default all)")
    p.add_argument("--best-of-k", choices=("softmax", "pairwise"), default=None,
                   help="loss for best-of-K picks: softmax over the K rewards (default) or K-1 pairs")
    p.add_argument("--eval-every", type=int, default=None, help="held-out evaluation every N steps (default 20)")
    p.add_argument("--eval-fraction", type=float, default=None, help="fraction of prompts held out (default 0.1)")
    p.add_argument("--norm-samples", type=int, default=None,
                   help="reference samples for normalization to mean 0, std 1 (default 64)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                   help="follow the job and print its progress (default); --no-wait returns at once")
    add_model_options(p)
    p.set_defaults(func=cmd_train_reward)

    p = sub.add_parser("eval-reward", help="accuracy of the reward model on a preference file (not imported)")
    p.add_argument("file", help="a preference file in any format `rlhf import` reads")
    p.add_argument("--version", type=int, default=None, help="reward version (default: the latest)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N pairs")
    add_model_options(p)
    p.set_defaults(func=cmd_eval_reward)


def job_config(args: argparse.Namespace) -> dict[str, Any]:
    """The RewardConfig fields given on the command line (the rest keep their defaults)."""
    from rlhf.reward import RewardConfig

    given = {"epochs": args.epochs, "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size,
             "accum": args.accum, "sources": args.sources, "best_of_k": args.best_of_k,
             "eval_every": args.eval_every, "eval_fraction": args.eval_fraction,
             "norm_samples": args.norm_samples, "seed": args.seed,
             "model": args.model, "quantize": args.quantize, "device": args.device}
    config = {k: v for k, v in given.items() if v is not None}
    RewardConfig.from_dict(config)  # bad values fail here, before a process starts
    return config


def progress_line(job: dict[str, Any], metrics: dict[str, list[tuple[int, float]]]) -> str:
    """One line per logged step: step/total, loss, accuracy, held-out accuracy."""
    def last(name: str) -> str:
        series = metrics.get(name)
        return f"{series[-1][1]:.3f}" if series else "-"

    total = job["total_steps"] or "?"
    return (f"step {job['step']}/{total}  loss {last('loss')}  accuracy {last('accuracy')}  "
            f"held-out accuracy {last('eval/accuracy')}  margin {last('margin')}")


def cmd_train_reward(args: argparse.Namespace) -> int:
    from rlhf import jobs
    from rlhf.cli import open_db

    from rlhf.reward import check_pairs

    config = job_config(args)
    with open_db(args) as store:
        check_pairs(store, config.get("sources", "all"))
        job_id = jobs.start_job(store, "reward", config)
        print(f"started reward job {job_id}; log in {store.path.parent / (store.path.stem + '-checkpoints')}"
              f"/job-{job_id}.log")
        if not args.wait:
            return 0
        seen = {"step": 0}

        def on_poll(job: dict[str, Any]) -> None:
            if job["step"] > seen["step"]:
                seen["step"] = job["step"]
                print(progress_line(job, store.metrics(job_id)), flush=True)

        try:
            job = jobs.wait(store, job_id, timeout_s=float("inf"), on_poll=on_poll)
        except KeyboardInterrupt:
            print(f"stopped following; job {job_id} keeps running in the background",
                  file=sys.stderr)
            return 130
        if job["status"] == "done":
            checkpoint = store.checkpoint("reward")
            meta = checkpoint["meta"] if checkpoint else {}
            print(f"reward version {checkpoint['version'] if checkpoint else '?'} saved: held-out accuracy "
                  f"{meta.get('eval_accuracy', float('nan')):.3f} on {meta.get('eval_pairs', 0)} pairs; "
                  f"normalized with gain {meta.get('gain', 1):.3f}, bias {meta.get('bias', 0):.3f}")
            return 0
        reason = f": {job['error']}" if job["error"] else ""
        print(f"job {job_id} {job['status']}{reason}", file=sys.stderr)
        return 1


def cmd_eval_reward(args: argparse.Namespace) -> int:
    from rlhf.cli import model_options, open_db, say
    from rlhf.exchange import read_preference_file
    from rlhf.models import load_stack
    from rlhf.reward import evaluate_texts, load_scorer

    with open_db(args) as store:
        if store.checkpoint("reward", args.version) is None:
            raise UserError("no reward model yet: train one with `rlhf train-reward`")
        pairs, errors = read_preference_file(args.file)
        for error in errors[:5]:
            say(f"skipped {error}")
        if len(errors) > 5:
            say(f"... and {len(errors) - 5} more bad records")
        if args.limit is not None:
            pairs = pairs[:args.limit]
        if not pairs:
            raise UserError(f"{args.file} holds no usable preference pairs: "
                            "check its format (see `rlhf import --help`)")
        stack = load_stack(model_options(args), progress=say)
        scorer = load_scorer(stack, store, args.version)
        assert scorer is not None
        started = time.monotonic()
        result = evaluate_texts(scorer, pairs)
    print(f"reward version {scorer.version}: accuracy {result.accuracy:.3f}, mean margin {result.margin:.3f} "
          f"(normalized units) on {result.n_pairs} pairs of {args.file} ({time.monotonic() - started:.0f} s)")
    return 0
