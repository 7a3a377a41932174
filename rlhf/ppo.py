"""The 'ppo' job (``rlhf ppo``, the PPO screen): a short PPO session in a
background process, and the checks made before one is started.

A session runs N iterations or M minutes; each iteration's policy is saved as a
new policy version (with its optimizer state and the latest batch), pause /
resume / stop take effect between iterations, and a stopped or killed session
resumes from its last checkpoint with the session's original reference and
reward scale. A session samples as its reward model's labels were sampled,
unless told otherwise (``session_settings``).

The parts: ``rlhf.ppo_config`` (the settings), ``rlhf.ppo_rollout`` (a batch of
experience and the rewards), ``rlhf.ppo_session`` (the iterations),
``rlhf.ppo_math`` (the formulas).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from rlhf.errors import UserError
from rlhf.model_stack import ModelStack
from rlhf.ppo_config import PPOConfig, PPOJob
from rlhf.ppo_rollout import Rollout, RuleScorer, Scorer, rule_scorer
from rlhf.ppo_session import NORMALIZATION_KEYS, KLBudgetSpent, PPOSession
from rlhf.rows import Checkpoint
from rlhf.sampling_params import DEFINITION_KEYS

PPO_SETTINGS = {f.name for f in fields(PPOConfig)}


@dataclass
class Start:
    """Where a session starts: the policy to train, its reference, and counters."""

    policy_version: int
    reference_version: int
    iteration: int = 0
    beta: float | None = None
    state_folder: Path | None = None
    normalization: dict[str, float] | None = None   # a resumed session's reward gain and bias
    reward: Any = None                                # ... and the reward they were measured for


def prepare_stack(stack: ModelStack, store: Any, job: PPOJob) -> Start:
    """Load the policy and reference of a new or resumed session into the stack.

    A new session trains from ``init_policy_version`` (None: the latest policy;
    0: the base) and measures KL from that same starting point. A resumed session
    continues from the latest checkpoint but keeps the reference of the session
    that wrote it: the reference is the policy as it was when the session
    started, not the checkpoint being resumed."""
    if job.resume:
        last = resume_checkpoint(store)
        stack.load_adapter("policy", last.path)
        stack.policy_version = last.version
        ref = last.meta["reference_version"]
        stack.load_reference(store.checkpoint("policy", ref).path if ref else None)
        meta = last.meta
        normalization = {k: meta[k] for k in NORMALIZATION_KEYS if k in meta} if "reward_gain" in meta else None
        return Start(last.version, ref, int(meta.get("iteration", 0)), meta.get("beta"), Path(last.path),
                     normalization, meta.get("reward"))
    version = start_policy(stack, store, job.init_policy_version)
    return Start(version, version)


def start_policy(stack: ModelStack, store: Any, version: int | None) -> int:
    """Load the policy a new session trains from (None: the latest; 0: the
    base) and freeze it as the reference. Returns its version."""
    checkpoint = store.checkpoint("policy", version) if version != 0 else None
    if checkpoint is None:
        return 0
    stack.load_policy(checkpoint.path, checkpoint.version)
    return checkpoint.version


def resume_checkpoint(store: Any) -> Checkpoint:
    """The checkpoint a resumed session continues from: the latest policy version,
    which must have been written by a PPO session (its meta names the reference)."""
    last = store.checkpoint("policy")
    if last is None or "reference_version" not in last.meta:
        raise UserError("nothing to resume: no PPO checkpoint yet; start a session with `rlhf ppo`")
    if last.meta.get("method"):  # trained by another method (DPO): no PPO state to go on from
        raise UserError(f"nothing to resume: the latest policy (v{last.version}) was trained by "
                        f"{last.meta['method'].upper()}; a new session (`rlhf ppo`) starts from it")
    return last


def load_reward(stack: ModelStack, store: Any, job: PPOJob, max_new_tokens: int) -> Scorer:
    """A rule (``reward: 'rule:...'``) or the trained reward model (latest, or a version)."""
    spec = job.reward
    if isinstance(spec, str) and spec.startswith("rule:"):
        tok = stack.tokenizer
        return rule_scorer(spec, tok.eos_token_id, max_new_tokens,
                           decode=lambda ids: tok.decode(ids, skip_special_tokens=True).strip())
    from rlhf.reward_scoring import load_scorer

    scorer = load_scorer(stack, store, spec)
    if scorer is None:
        raise UserError("no reward model: train one first (rlhf train-reward)")
    return scorer


def session_settings(store: Any, job: PPOJob) -> PPOJob:
    """The job completed, so that a session samples as its reward model was
    trained: a new session without sampling settings takes the definition of the
    completions its reward model was trained on; a resumed session keeps its own
    settings and reward (settings given now override them)."""
    if job.resume:
        meta = resume_checkpoint(store).meta
        # A setting this version no longer has is dropped from an older session's.
        saved = {k: v for k, v in meta.get("config", {}).items() if k in PPO_SETTINGS}
        reward = meta.get("reward") if job.reward is None else job.reward
        return replace(job, reward=reward, ppo={**saved, **job.ppo})
    definition = reward_sampling(store, job.reward) or {}
    sampling = {k: definition[k] for k in DEFINITION_KEYS if k in definition and job.ppo.get(k) is None}
    return replace(job, ppo={**job.ppo, **sampling})


def reward_sampling(store: Any, spec: Any) -> dict[str, Any] | None:
    """How the completions behind a reward version were sampled (None for a rule,
    imported text, or a reward version from before this was recorded)."""
    if isinstance(spec, str) and spec.startswith("rule:"):
        return None
    checkpoint = store.checkpoint("reward", None if spec is None else int(spec))
    return checkpoint.meta.get("sampling") if checkpoint else None


def sampling_mismatch(job: PPOJob, store: Any) -> str | None:
    """A warning when the session samples otherwise than its reward model's labels
    were sampled: the reward model would then score a kind of text it never saw."""
    definition = reward_sampling(store, job.reward)
    if not definition:
        return None
    ppo = PPOConfig.from_dict(job.ppo)
    differ = [f"{k} {getattr(ppo, k)} (labels: {definition[k]})" for k in DEFINITION_KEYS
              if k in definition and float(getattr(ppo, k)) != float(definition[k])]
    if not differ:
        return None
    return ("this session samples otherwise than the reward model's labels were sampled: " + ", ".join(differ)
            + "; the reward model will score text unlike what it learned from")


def session_prompts(store: Any, job: PPOJob) -> list[str]:
    """The store's prompts, or the job's prompt file."""
    if job.prompt_file:
        from rlhf.prompts import read_prompt_file

        return read_prompt_file(job.prompt_file).prompts
    return store_prompts(store)


def store_prompts(store: Any) -> list[str]:
    prompts = [p.text for p in store.prompts()]
    if not prompts:
        raise UserError(f"no prompts in {store.path}: add some with `rlhf prompts add FILE` (or `rlhf init`)")
    return prompts


def check_can_start(store: Any, job: PPOJob) -> None:
    """The user errors a session would hit, found before a process is spawned."""
    job = session_settings(store, job)  # resuming: its checkpoint (or "nothing to resume"), own reward
    if not job.resume and job.init_policy_version:
        store.checkpoint("policy", job.init_policy_version)  # raises when there is no such version
    spec = job.reward
    if isinstance(spec, str) and spec.startswith("rule:"):
        rule_scorer(spec, 0, 1)
    elif spec is not None:
        store.checkpoint("reward", int(spec))
    elif store.checkpoint("reward") is None:
        raise UserError("no reward model: train one first (rlhf train-reward)")
    if not job.prompt_file:
        store_prompts(store)
    if not job.iterations and not job.minutes:
        raise UserError("a PPO session needs an end: pass --iterations N or --minutes M")


def start_session(store: Any, job: PPOJob) -> int:
    """Check the job and start it in its own process; returns its id."""
    from rlhf.jobs import start_job

    check_can_start(store, job)
    return start_job(store, "ppo", job.to_dict())


def run_job(ctx: Any) -> None:
    """The 'ppo' job: a short PPO session in this (background) process."""
    from rlhf.models import load_stack

    job = session_settings(ctx.store, PPOJob.from_dict(ctx.config))
    ppo = PPOConfig.from_dict(job.ppo)
    warning = sampling_mismatch(job, ctx.store)
    if warning:
        print(f"WARNING: {warning}", flush=True)
    if ppo.seed is not None:
        torch.manual_seed(ppo.seed)
    stack = load_stack(job.model, progress=lambda msg: print(msg, flush=True))
    start = prepare_stack(stack, ctx.store, job)
    scorer = load_reward(stack, ctx.store, job, ppo.max_new_tokens)
    reward = job.reward if isinstance(scorer, RuleScorer) else getattr(scorer, "version", None)
    # A resumed session keeps its reward's scale, unless it now follows another
    # reward, which is then normalized on the first batch like a new session's.
    normalization = start.normalization if start.reward == reward else None
    session = PPOSession(stack, scorer, session_prompts(ctx.store, job), ppo, beta=start.beta,
                         normalization=normalization)
    if start.state_folder is not None:
        session.load_state(start.state_folder)
    iterations, minutes = job.iterations, job.minutes
    if iterations:
        ctx.set_total(start.iteration + int(iterations))
    save_every = max(1, job.save_every)
    began = time.monotonic()
    version, done, batch = start.policy_version, 0, None
    pending = False  # an iteration trained but not yet saved
    last_metrics: dict[str, float] = {}
    while True:
        try:
            ctx.checkpoint()  # pause / stop between iterations
            iteration = start.iteration + done + 1
            sampled_by = None if pending else version  # the policy as saved, or ahead of every saved version
            metrics, batch = session.iteration(iteration)
        except KLBudgetSpent as spent:
            if pending and batch is not None:
                version = save_checkpoint(ctx, session, batch, start.iteration + done, version,
                                          start.reference_version, last_metrics, reward)
            ctx.log(iteration, spent.metrics)
            ctx.store.add_rollouts(ctx.job_id, iteration, version, spent.batch.rows())
            end_past_budget(ctx, spent, version, start.policy_version, iteration)
            break
        except BaseException:
            # A stop, or an update that diverged (and was undone), keeps the
            # iterations trained before it.
            if pending and batch is not None:
                save_checkpoint(ctx, session, batch, start.iteration + done, version, start.reference_version,
                                last_metrics, reward)
            raise
        last_metrics = metrics
        done += 1
        ctx.log(iteration, metrics)
        ctx.store.add_rollouts(ctx.job_id, iteration, sampled_by, batch.rows())
        pending = True
        finished = (iterations and done >= int(iterations)) or (minutes and time.monotonic() - began >= 60 * minutes)
        if done % save_every == 0 or finished:
            version = save_checkpoint(ctx, session, batch, iteration, version, start.reference_version, metrics,
                                      reward)
            pending = False
        if finished:
            break


def end_past_budget(ctx: Any, spent: KLBudgetSpent, version: int, start_version: int, iteration: int) -> None:
    """The batch of ``iteration``, sampled by ``version``, passed the KL budget:
    mark that version (when this session made it) and say which is the last within."""
    if version == start_version:  # only a resumed session starts away from its reference: say so, do not end quietly
        raise UserError(f"{spent} at the first batch: the session resumed from v{version}, which is already past "
                        "it; resume with a larger --kl-budget, or start a new session")
    checkpoint = ctx.store.checkpoint("policy", version)
    ctx.store.update_checkpoint_meta("policy", version, {**checkpoint.meta, "own_kl": spent.kl,
                                                         "over_kl_budget": spent.budget})
    print(f"iteration {iteration}: {spent} (sampled by v{version}): the session ends; v{checkpoint.parent_version} "
          "is the last version within it", flush=True)


def save_checkpoint(ctx: Any, session: PPOSession, batch: Rollout, iteration: int, parent: int,
                    reference_version: int, metrics: dict[str, float], reward: Any = None) -> int:
    """Save the policy adapter (with the value head) and optimizer; register it as
    the next policy version, with what a resumed session needs to go on as this
    one did (reference, beta, reward and its normalization, settings). Returns
    the version."""
    folder = Path(ctx.checkpoint_root) / "policy" / f"ppo-job{ctx.job_id}-iter{iteration}"
    meta = {"job_id": ctx.job_id, "iteration": iteration, "reference_version": reference_version,
            "beta": session.beta, "rollout_score": metrics["objective/scores"], "kl": metrics["objective/kl"],
            "reward": reward, **(session.normalization or {}), "config": asdict(session.config)}
    session.stack.save_adapter("policy", folder, meta)
    session.save_state(folder, batch)
    version = ctx.store.add_checkpoint("policy", folder, job_id=ctx.job_id, parent_version=parent, meta=meta)
    session.stack.policy_version = version
    print(f"iteration {iteration}: saved policy version {version} ({folder})", flush=True)
    return version
