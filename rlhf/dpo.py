"""The 'dpo' job: the labeled pairs turned into a policy directly (DPO), in a
background process like the reward and PPO jobs, on the one shared base.

The reference is the policy the job starts from (a frozen copy of a trained
version, or the base with the adapter off), as PPO's. After each epoch the
policy answers a few labeled prompts and its KL to the reference is measured on
those answers (DPO itself reports no drift), then the policy is saved as a new
version: the drift view, `rlhf eval-policy` and the labeling queue take it like
a PPO version.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from rlhf.dpo_config import DPOJob
from rlhf.dpo_train import store_pairs, train_dpo
from rlhf.errors import UserError

METHOD = "dpo"  # a version's meta "method": what trained it (PPO sessions' versions have none)


def check_can_start(store: Any, job: DPOJob) -> None:
    """The user errors the job would hit, found before a process is spawned."""
    from rlhf.reward import check_pairs

    if job.init_policy_version:
        store.checkpoint("policy", job.init_policy_version)
    check_pairs(store, job.dpo.sources, "for DPO")


def start_job(store: Any, job: DPOJob) -> int:
    from rlhf.jobs import start_job as start

    check_can_start(store, job)
    return start(store, "dpo", job.to_dict(), total_steps=None)


def run_job(ctx: Any) -> None:
    """Train, measuring KL and saving a policy version after each epoch."""
    from rlhf.evaluation import sequence_kls
    from rlhf.models import load_stack
    from rlhf.ppo import start_policy
    from rlhf.sampling import SamplingParams, sample_k

    job = DPOJob.from_dict(ctx.config)
    config = job.dpo
    torch.manual_seed(config.seed)
    stack = load_stack(job.model, progress=lambda msg: print(msg, flush=True))
    version = start_policy(stack, ctx.store, job.init_policy_version)
    reference = version
    pairs = store_pairs(ctx.store, stack.tokenizer, sources=config.sources,
                        max_completion_tokens=config.max_completion_tokens)
    if not pairs:
        raise UserError("no preference pairs for DPO: label some comparisons first")
    kl_prompts = list(dict.fromkeys(p.prompt for p in pairs))[:config.kl_prompts]
    params = SamplingParams()  # the one definition: as the labels were sampled

    def on_epoch(epoch: int, held: dict[str, float]) -> dict[str, float]:
        nonlocal version
        kls = []
        if kl_prompts:
            with torch.no_grad():
                answers = sample_k(stack, kl_prompts, 1, params, role="policy")
            kls = [kl for prompt, row in zip(kl_prompts, answers)
                   for kl in sequence_kls(stack, prompt, row, "policy", "reference", params.temperature)]
        kl = sum(kls) / len(kls) if kls else None  # --kl-prompts 0: not measured
        folder = ctx.checkpoint_root / "policy" / f"dpo-job{ctx.job_id}-epoch{epoch}"
        meta = {"job_id": ctx.job_id, "iteration": epoch, "method": METHOD, "reference_version": reference,
                "kl": kl, "eval_accuracy": held.get("eval/rewards/accuracies"),
                "eval_pairs": held.get("eval/pairs"), "config": asdict(config)}
        stack.save_adapter("policy", folder, meta)
        parent, version = version, ctx.store.add_checkpoint("policy", folder, job_id=ctx.job_id,
                                                            parent_version=version, meta=meta)
        stack.policy_version = version
        print(f"epoch {epoch}: saved policy version {version} (from v{parent}); KL "
              f"{'not measured' if kl is None else f'{kl:.3f}'}; held-out accuracy "
              f"{held.get('eval/rewards/accuracies', float('nan')):.2f}", flush=True)
        return {"epoch_end": float(epoch)} | ({} if kl is None else {"objective/kl": kl})

    train_dpo(stack, pairs, config, log=ctx.log, checkpoint=ctx.checkpoint, set_total=ctx.set_total,
              on_epoch=on_epoch)

