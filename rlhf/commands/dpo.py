"""`rlhf dpo`: the labeled pairs turned into a policy directly (DPO), as a
background job that saves a policy version after each epoch (rlhf/dpo.py)."""

from __future__ import annotations

import argparse
import sys

from rlhf.commands.common import (add_model_options, at_least, config_options, given_settings, model_options,
                                  open_db, positive)


def register(sub: argparse._SubParsersAction) -> None:
    from rlhf.dpo_config import DPOConfig

    settings = config_options(DPOConfig, types={"beta": positive, "learning_rate": positive, "epochs": at_least(1),
                                                "batch_size": at_least(1), "kl_prompts": at_least(0)})
    p = sub.add_parser("dpo", parents=[settings], help="train the policy on the labeled pairs with DPO "
                                                       "(a background job; a policy version per epoch)",
                       description="DPO (Rafailov et al. 2023) on the same labels the reward model learns from, "
                                   "against the policy it starts from as the reference. Compare it with PPO, "
                                   "RLOO and best-of-N by `rlhf eval-policy` and the drift view.")
    p.add_argument("--policy-version", dest="init_policy_version", type=at_least(0), default=None,
                   help="policy version to start from (default: the latest; 0 = the base)")
    p.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                   help="follow the job and print each epoch (default); --no-wait returns at once")
    add_model_options(p)
    p.set_defaults(func=cmd_dpo)


def cmd_dpo(args: argparse.Namespace) -> int:
    from rlhf import jobs
    from rlhf.dpo import start_job
    from rlhf.dpo_config import DPOConfig, DPOJob

    job = DPOJob(init_policy_version=args.init_policy_version, model=model_options(args),
                 dpo=DPOConfig.from_dict(given_settings(args, DPOConfig)))
    with open_db(args) as store:
        job_id = start_job(store, job)
        print(f"started DPO job {job_id}; log in {jobs.log_path(store.path, job_id)}; `rlhf jobs cancel "
              f"{job_id}` stops it")
        if not args.wait:
            return 0

        def on_step(row: object, step: int, metrics: dict[str, float]) -> None:
            if "epoch_end" not in metrics:
                return
            accuracy, kl = metrics.get("eval/rewards/accuracies"), metrics.get("objective/kl")
            held = "" if accuracy is None else (f"  held-out accuracy {accuracy:.2f} on "
                                                f"{metrics.get('eval/pairs', 0):.0f} pairs")
            loss = "" if metrics.get("loss") is None else f"  loss {metrics['loss']:.3f}"
            print(f"epoch {metrics['epoch_end']:.0f}  step {step}{loss}  KL "
                  f"{'not measured' if kl is None else f'{kl:.3f}'}{held}", flush=True)

        try:
            row = jobs.follow(store, job_id, on_step)
        except KeyboardInterrupt:
            print(f"stopped following; job {job_id} keeps running in the background (`rlhf jobs cancel "
                  f"{job_id}` stops it)", file=sys.stderr)
            return 130
    if row.status != "done":
        print(f"rlhf: error: DPO job {job_id} {row.status}: {row.error}", file=sys.stderr)
        return 1
    print(f"DPO job {job_id} done; the latest policy version is its last epoch (`rlhf eval-policy` judges it)")
    return 0
