"""`rlhf ppo` (start or resume a PPO session in the background) and
`rlhf ppo-control pause|resume|stop`."""

from __future__ import annotations

import argparse
from typing import Any

from rlhf.commands.common import add_model_options, add_sampling_options, at_least, open_db, positive, say
from rlhf.errors import UserError
from rlhf.rows import Job

# What --wait prints per iteration: (metric, label, format).
PROGRESS = (("objective/scores", "score", "{:.3f}"), ("objective/scores_std", "std", "{:.2f}"),
            ("objective/kl", "kl", "{:.3f}"), ("beta", "beta", "{:.4f}"),
            ("objective/entropy", "entropy", "{:.1f}"), ("val/ratio", "ratio", "{:.3f}"),
            ("policy/clipfrac", "clipfrac", "{:.2f}"), ("val/eos_fraction", "eos", "{:.2f}"),
            ("val/completion_tokens", "len", "{:.1f}"), ("val/score_length_corr", "r(score,len)", "{:+.2f}"),
            ("time/iteration_s", "s", "{:.1f}"))


def register(sub: argparse._SubParsersAction) -> None:

    p = sub.add_parser("ppo", help="run a short KL-regularized PPO session in the background",
                       description="Start (or with --resume, continue) a PPO session as a background job. "
                                   "Each iteration saves the policy as a new version. Defaults: see "
                                   "rlhf.ppo_config.PPOConfig.")
    p.add_argument("--iterations", type=at_least(1), default=None, help="iterations in this session (default 10 "
                                                                  "unless --minutes is given)")
    p.add_argument("--minutes", type=positive, default=None, help="stop after the iteration that passes M minutes")
    p.add_argument("--beta", type=float, default=None, help="KL coefficient (default 0.05; the starting "
                                                            "value with --adaptive-kl)")
    p.add_argument("--adaptive-kl", action="store_true", default=None,
                   help="adapt beta towards --target-kl (lm-human-preferences' controller)")
    p.add_argument("--target-kl", type=positive, default=None, help="target KL in nats per sequence (default 6)")
    p.add_argument("--batch-size", type=at_least(2), default=None, help="episodes per iteration (default 16)")
    p.add_argument("--mini-batch-size", type=at_least(1), default=None, help="sequences per optimizer step (default 4)")
    p.add_argument("--epochs", type=at_least(1), default=None, help="PPO epochs over each batch (default 4)")
    add_sampling_options(p, defaults=False)
    p.add_argument("--missing-eos", choices=("off", "replace", "subtract"), default=None,
                   help="score of an answer that never emitted EOS: off = the reward model's (default: measured, "
                        "most answers of the embedded model do not finish within the budget), replace = "
                        "-penalty, subtract = score - penalty")
    p.add_argument("--missing-eos-penalty", type=float, default=None, help="the penalty (default 1.0)")
    p.add_argument("--lr", dest="learning_rate", type=positive, default=None, help="learning rate (default 1e-4)")
    p.add_argument("--gae-lambda", dest="lam", type=float, default=None,
                   help="GAE lambda: 1 gives every token the whole score, lower leans on the value head "
                        "(default: see rlhf.ppo_config.PPOConfig)")
    p.add_argument("--reward", default=None,
                   help="reward version (default: the latest), or a rule optimized directly, e.g. rule:short, "
                        "rule:distinct, rule:contains=WORD (see `rlhf label --help`)")
    p.add_argument("--policy-version", dest="init_policy_version", type=at_least(0), default=None,
                   help="policy version to start from (default: the latest; 0 = the base)")
    p.add_argument("--prompt-file", default=None, help="prompts from this file instead of the database")
    p.add_argument("--save-every", type=at_least(1), default=None, help="save a version every N iterations (default 1)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--resume", action="store_true",
                   help="continue the last session from its latest checkpoint, against that session's reference")
    p.add_argument("--wait", action="store_true", help="stay and print each iteration until the session ends")
    add_model_options(p)
    p.set_defaults(func=cmd_ppo)

    c = sub.add_parser("ppo-control", help="pause, resume or stop the running PPO session")
    c.add_argument("action", choices=("pause", "resume", "stop"))
    c.add_argument("--job", type=at_least(1), default=None, help="job id (default: the active PPO job)")
    c.set_defaults(func=cmd_ppo_control)


def session_config(args: argparse.Namespace) -> dict[str, Any]:
    """The job config from the options; unset options keep PPOConfig's defaults."""
    keys = ("iterations", "minutes", "beta", "adaptive_kl", "target_kl", "batch_size", "mini_batch_size", "epochs",
            "max_new_tokens", "temperature", "top_p", "missing_eos", "missing_eos_penalty", "learning_rate",
            "lam", "init_policy_version", "prompt_file", "save_every", "seed")
    config: dict[str, Any] = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if args.iterations is None and args.minutes is None:
        config["iterations"] = 10
    reward = args.reward
    if reward is not None and not reward.startswith("rule:"):
        if not reward.isdigit():
            raise UserError(f"--reward {reward!r}: pass a reward version number or rule:NAME")
        reward = int(reward)
    config.update(reward=reward, resume=args.resume, model=args.model, quantize=args.quantize, device=args.device)
    return config


def cmd_ppo(args: argparse.Namespace) -> int:
    from rlhf import jobs
    from rlhf.ppo import check_can_start, sampling_mismatch, session_settings, start_session
    from rlhf.ppo_config import PPOConfig

    config = session_config(args)
    with open_db(args) as store:
        check_can_start(store, config)
        settings = session_settings(store, config)
        ppo = PPOConfig.from_dict(settings)  # bad values fail here, not in the background
        job_id = start_session(store, config)
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
        job = follow(store, job_id, say)
    if job.status == "failed":
        print(f"rlhf: error: PPO job {job_id} failed: {job.error}")
        return 1
    print(f"PPO job {job_id} {job.status} after iteration {job.step}")
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
