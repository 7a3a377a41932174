"""`rlhf train-reward` and `rlhf eval-reward`: the reward model from the command line.

Training runs as a background job (the same one the app's Train screen starts);
by default this command follows it and prints a line per logged step. Torch and
the engine are imported inside the handlers so `rlhf --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rlhf.commands.common import add_model_options, at_least, config_options, given_settings, model_options, open_db, positive, say
from rlhf.errors import UserError
from rlhf.rows import Job
from rlhf.text_input import error_summary

if TYPE_CHECKING:
    from rlhf.reward_config import RewardJob


def register(sub: argparse._SubParsersAction) -> None:

    from rlhf.reward_config import RewardConfig

    # The training settings come from RewardConfig's fields; a range check while
    # parsing where a value could only fail in the background.
    settings = config_options(RewardConfig, types={
        name: at_least(1) for name in ("layer", "epochs", "steps", "max_epochs", "patience", "batch_size", "accum",
                                       "eval_every", "max_length", "max_completion_tokens")} | {"lr": positive})
    p = sub.add_parser("train-reward", parents=[settings],
                       help="train a reward model on the recorded pairs (a background job)")
    p.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                   help="follow the job and print its progress (default); --no-wait returns at once")
    add_model_options(p)
    p.set_defaults(func=cmd_train_reward)

    p = sub.add_parser("eval-reward", help="accuracy of the reward model on a preference file (not imported)")
    p.add_argument("file", help="a preference file in any format `rlhf import` reads")
    p.add_argument("--version", type=at_least(1), default=None, help="reward version (default: the latest)")
    p.add_argument("--limit", type=at_least(1), default=None, help="evaluate only the first N pairs")
    add_model_options(p)
    p.set_defaults(func=cmd_eval_reward)


def reward_job(args: argparse.Namespace) -> RewardJob:
    """The job from the options; settings not given keep RewardConfig's defaults.
    Bad values fail here, before a process starts."""
    from rlhf.reward_config import RewardConfig, RewardJob

    return RewardJob(model=model_options(args), reward=RewardConfig.from_dict(given_settings(args, RewardConfig)))


def progress_line(job: Job, step: int, metrics: dict[str, float]) -> str:
    """One line per logged step: step/total, loss, accuracy, held-out accuracy."""
    def shown(name: str) -> str:
        return f"{metrics[name]:.3f}" if name in metrics else "-"

    total = job.total_steps or "?"
    return (f"step {step}/{total}  loss {shown('loss')}  accuracy {shown('accuracy')}  "
            f"held-out accuracy {shown('eval/accuracy')}  margin {shown('margin')}")


def summary_lines(version: int, meta: dict[str, Any]) -> list[str]:
    """What a finished reward job says: held-out accuracy with its count and
    interval, how long it trained, and the length check."""
    from rlhf.stats import rate_text

    from rlhf.reward_config import held_out_name

    accuracy = meta.get("eval_accuracy")
    held = (f"{held_out_name(meta)} accuracy {rate_text(accuracy, int(meta['eval_pairs']), independent=meta.get('eval_elements'))}"
            if meta.get("eval_pairs") else "no held-out pairs (too few prompts): accuracy unknown")
    kept = " (early stopping: kept step {best_step})".format(**meta) if meta.get("stopped_early") else ""
    readout = meta.get("readout") or {}
    heads = int(meta.get("heads", 1))
    what = f"an ensemble of {heads} heads" if heads > 1 else "the head"
    how = (f"{what}{' and the adapter' if meta.get('finetuned') else ''} on layer {readout.get('layer', '?')} "
           f"({readout.get('pool', '?')} read-out)")
    lines = [f"reward version {version} saved: {held}",
             f"trained {how}: {meta.get('steps', 0)} steps, {meta.get('epochs', 0):.1f} epochs{kept}"]
    corr, longer = meta.get("length_corr"), meta.get("labels_prefer_longer")
    check = f"score~length r = {corr:+.2f}" if corr is not None else "score~length r = -"
    if longer is not None:
        check += f"; the labels chose the longer completion in {longer:.0%} of {meta.get('length_pairs')} pairs"
    lines.append(check + " (near 0 and 50%: the taste is not length)")
    return lines


def cmd_train_reward(args: argparse.Namespace) -> int:
    from rlhf import jobs
    from rlhf.reward import check_pairs

    job = reward_job(args)
    with open_db(args) as store:
        check_pairs(store, job.reward.sources)
        job_id = jobs.start_job(store, "reward", job.to_dict())
        print(f"started reward job {job_id}; log in {jobs.log_path(store.path, job_id)}")
        if not args.wait:
            return 0
        latest: dict[str, float] = {}  # held-out figures come every few steps: show the last ones

        def on_step(job: Job, step: int, metrics: dict[str, float]) -> None:
            latest.update(metrics)
            print(progress_line(job, step, latest), flush=True)

        try:
            job = jobs.follow(store, job_id, on_step)
        except KeyboardInterrupt:
            print(f"stopped following; job {job_id} keeps running in the background",
                  file=sys.stderr)
            return 130
        if job.status == "done":
            checkpoint = store.checkpoint("reward")
            assert checkpoint is not None
            for line in summary_lines(checkpoint.version, checkpoint.meta):
                print(line)
            return 0
        reason = f": {job.error}" if job.error else ""
        print(f"job {job_id} {job.status}{reason}", file=sys.stderr)
        return 1


def tenths(template: str) -> Callable[[int, int], None]:
    """A progress callback that says ``template`` (with done and total) at each tenth of the way."""
    said = [-1]

    def report(done: int, total: int) -> None:
        tenth = done * 10 // max(total, 1)
        if tenth != said[0]:
            said[0] = tenth
            say(template.format(done=done, total=total))
    return report


def cmd_eval_reward(args: argparse.Namespace) -> int:
    from rlhf.exchange_import import read_preference_file
    from rlhf.models import load_stack
    from rlhf.reward_eval import evaluate_texts
    from rlhf.reward_scoring import load_scorer

    with open_db(args) as store:
        if store.checkpoint("reward", args.version) is None:
            raise UserError("no reward model yet: train one with `rlhf train-reward`")
        pairs, errors = read_preference_file(args.file)
        for line in error_summary(errors):
            say(line)
        if args.limit is not None:
            pairs = pairs[:args.limit]
        if not pairs:
            raise UserError(f"{args.file} holds no usable preference pairs: "
                            "check its format (see `rlhf import --help`)")
        stack = load_stack(model_options(args), progress=say)
        scorer = load_scorer(stack, store, args.version)
        assert scorer is not None
        started = time.monotonic()
        result = evaluate_texts(scorer, pairs, progress=tenths("scored {done}/{total} pairs"))
    print(f"reward version {scorer.version}: accuracy {result.accuracy:.3f}, mean margin {result.margin:.3f} "
          f"(normalized units) on {result.n_pairs} pairs of {args.file} ({time.monotonic() - started:.0f} s)")
    return 0
