"""`rlhf ppo` (start or resume a PPO session in the background) and
`rlhf ppo-control pause|resume|stop`."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from rlhf.commands.common import (add_model_options, at_least, config_options, fraction, given_settings, model_options,
                                  open_db, positive, say)
from rlhf.errors import UserError
from rlhf.rows import Job

if TYPE_CHECKING:
    from rlhf.ppo_config import PPOJob

# What --wait prints per iteration: (metric, label, format).
PROGRESS = (("objective/scores", "score", "{:.3f}"), ("objective/scores_std", "std", "{:.2f}"),
            ("objective/kl", "kl", "{:.3f}"), ("beta", "beta", "{:.4f}"),
            ("objective/entropy", "entropy", "{:.1f}"), ("val/ratio", "ratio", "{:.3f}"),
            ("policy/clipfrac", "clipfrac", "{:.2f}"), ("val/eos_fraction", "eos", "{:.2f}"),
            ("val/completion_tokens", "len", "{:.1f}"), ("val/score_length_corr", "r(score,len)", "{:+.2f}"),
            ("reward/spread", "spread", "{:.2f}"), ("time/iteration_s", "s", "{:.1f}"))


def register(sub: argparse._SubParsersAction) -> None:

    from rlhf.ppo_config import DEFAULT_ITERATIONS, PPOConfig

    # The PPO settings come from PPOConfig's fields; a range check while parsing
    # where a value could only fail in the background.
    settings = config_options(PPOConfig, types={
        "batch_size": at_least(2), "mini_batch_size": at_least(1), "forward_batch_size": at_least(1),
        "epochs": at_least(1), "max_new_tokens": at_least(1), "temperature": positive, "top_p": fraction,
        "learning_rate": positive, "target_kl": positive})
    p = sub.add_parser("ppo", parents=[settings], help="run a short KL-regularized PPO session in the background",
                       description="Start (or with --resume, continue) a PPO session as a background job. "
                                   "Each iteration saves the policy as a new version.")
    p.add_argument("--iterations", type=at_least(1), default=None, help="iterations in this session (default "
                                                                  f"{DEFAULT_ITERATIONS} "
                                                                  "unless --minutes is given)")
    p.add_argument("--minutes", type=positive, default=None, help="stop after the iteration that passes M minutes")
    p.add_argument("--reward", default=None,
                   help="reward version (default: the latest), or a rule optimized directly, e.g. rule:short, "
                        "rule:distinct, rule:contains=WORD (see `rlhf label --help`)")
    p.add_argument("--policy-version", dest="init_policy_version", type=at_least(0), default=None,
                   help="policy version to start from (default: the latest; 0 = the base)")
    p.add_argument("--prompt-file", default=None, help="prompts from this file instead of the database")
    p.add_argument("--save-every", type=at_least(1), default=1, help="save a version every N iterations (default 1)")
    p.add_argument("--resume", action="store_true",
                   help="continue the last session from its latest checkpoint, against that session's reference "
                        "and with its settings (those given now override them)")
    p.add_argument("--wait", action="store_true", help="stay and print each iteration until the session ends")
    add_model_options(p)
    p.set_defaults(func=cmd_ppo)

    c = sub.add_parser("ppo-control", help="pause, resume or stop the running PPO session")
    c.add_argument("action", choices=("pause", "resume", "stop"))
    c.add_argument("--job", type=at_least(1), default=None, help="job id (default: the active PPO job)")
    c.set_defaults(func=cmd_ppo_control)


def session_job(args: argparse.Namespace) -> PPOJob:
    """The job from the options; PPO settings not given are left to the session
    (``rlhf.ppo.session_settings``)."""
    from rlhf.ppo_config import DEFAULT_ITERATIONS, PPOConfig, PPOJob

    iterations = DEFAULT_ITERATIONS if args.iterations is None and args.minutes is None else args.iterations
    reward = args.reward
    if reward is not None and not reward.startswith("rule:"):
        if not reward.isdigit():
            raise UserError(f"--reward {reward!r}: pass a reward version number or rule:NAME")
        reward = int(reward)
    return PPOJob(iterations=iterations, minutes=args.minutes, reward=reward,
                  init_policy_version=args.init_policy_version, prompt_file=args.prompt_file,
                  save_every=args.save_every, resume=args.resume, model=model_options(args),
                  ppo=given_settings(args, PPOConfig))


def cmd_ppo(args: argparse.Namespace) -> int:
    from rlhf import jobs
    from rlhf.ppo import check_can_start, sampling_mismatch, session_settings, start_session
    from rlhf.ppo_config import PPOConfig

    job = session_job(args)  # bad values fail here, not in the background
    with open_db(args) as store:
        check_can_start(store, job)
        settings = session_settings(store, job)
        ppo = PPOConfig.from_dict(settings.ppo)
        job_id = start_session(store, job)
        what = "resumed" if args.resume else "started"
        log = jobs.log_path(store.path, job_id)
        print(f"PPO session {what}: job {job_id} (log: {log}); `rlhf ppo-control pause|resume|stop` controls it")
        print(f"sampling: temperature {ppo.temperature}, top-p {ppo.top_p}, {ppo.max_new_tokens} new tokens; "
              f"missing EOS: {ppo.missing_eos}" + (f" ({ppo.missing_eos_penalty})" if ppo.missing_eos != "off" else ""))
        warning = sampling_mismatch(settings, store)
        if warning:
            say(f"warning: {warning}")
        if not args.wait:
            return 0
        row = follow(store, job_id, say)
    if row.status == "failed":
        print(f"rlhf: error: PPO job {job_id} failed: {row.error}")
        return 1
    print(f"PPO job {job_id} {row.status} after iteration {row.step}")
    return 0


def follow(store: Any, job_id: int, say: Any) -> Job:
    """Print each new iteration's metrics until the job ends; returns its row."""
    from rlhf import jobs
    from rlhf.ppo_session import penalty_warning

    def on_step(job: Job, step: int, row: dict[str, float]) -> None:
        parts = [f"{label} {fmt.format(row[name])}" for name, label, fmt in PROGRESS if name in row]
        print(f"iteration {step}: " + "  ".join(parts), flush=True)
        warning = penalty_warning(row)
        if warning:
            print(f"warning: {warning}", flush=True)

    try:
        return jobs.follow(store, job_id, on_step)
    except KeyboardInterrupt:
        say(f"stopped following; job {job_id} keeps running (`rlhf ppo-control stop` ends it)")
        raise


def cmd_ppo_control(args: argparse.Namespace) -> int:
    from rlhf import jobs

    with open_db(args) as store:
        job_id = args.job
        if job_id is None:
            active = jobs.active_job(store)
            if active is None or active.kind != "ppo":
                raise UserError("no PPO session is running: start one with `rlhf ppo`")
            job_id = active.id
        elif store.job(job_id).kind != "ppo":
            raise UserError(f"job {job_id} is not a PPO session")
        jobs.request(store, job_id, "cancel" if args.action == "stop" else args.action)
    print(f"asked PPO job {job_id} to {args.action} (it acts between iterations)"
          + ("; continue later with `rlhf ppo --resume`" if args.action == "stop" else ""))
    return 0
