"""Every PPO rollout, kept (the store's ``rollouts`` table): written out as JSONL,
and sent to the labeling queue, where labels reach what the policy produces now,
which is where the reward model is least tested.

TRL keeps only the latest samples in view (TRL issue 2045) and verl users ask
for saved rollouts (verl issue 1106); here every iteration's batch is a row per
completion with its score, the ensemble's spread, its KL and the version that
sampled it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rlhf.errors import UserError
from rlhf.rows import RolloutRow
from rlhf.sampling_params import SamplingParams
from rlhf.store import Store

# Sample n more completions of a prompt from a policy version: (prompt, version, n) -> Samples.
SampleMore = Callable[[str, int, int], list[Any]]


def ppo_job_id(store: Store, job_id: int | None) -> int:
    """The PPO job asked for, or the latest one; a clear error when there is none."""
    if job_id is None:
        jobs = store.jobs("ppo")
        if not jobs:
            raise UserError(f"no PPO session in {store.path}: run one with `rlhf ppo`")
        return max(job.id for job in jobs)
    if store.job(job_id).kind != "ppo":
        raise UserError(f"job {job_id} is not a PPO session: `rlhf jobs` lists them")
    return job_id


def export_rollouts(store: Store, out: str | Path, job_id: int | None = None) -> int:
    """Write the kept rollouts of one PPO job (every job when None) as JSONL, one
    completion per line with its job, iteration and the version that sampled it;
    whole or not at all. Returns the number written."""
    out = Path(out)
    if not out.parent.exists():
        raise UserError(f"folder {out.parent} does not exist: create it or choose another output path")
    jobs = [job_id] if job_id is not None else sorted(job.id for job in store.jobs("ppo"))
    rows = [row for job in jobs for row in store.rollouts(job)]
    if not rows:
        which = f"PPO job {job_id}" if job_id is not None else "any PPO session"
        raise UserError(f"no rollouts kept of {which} in {store.path}: run `rlhf ppo` first")
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(rollout_record(row), ensure_ascii=False) + "\n")
    tmp.replace(out)  # a reader never sees half a file
    return len(rows)


def rollout_record(row: RolloutRow) -> dict[str, Any]:
    """A kept rollout as an exported line (its token ids left out: they are the
    base model's, and the text says the same)."""
    record = asdict(row)
    del record["id"], record["token_ids"]
    return record


def session_sampling(store: Store, job_id: int) -> SamplingParams:
    """How a PPO job's policy answered: the session settings its saved versions record."""
    for checkpoint in store.checkpoints("policy"):
        config = checkpoint.meta.get("config") if checkpoint.job_id == job_id else None
        if config:
            return SamplingParams(temperature=config["temperature"], top_p=config["top_p"],
                                  max_new_tokens=config["max_new_tokens"])
    raise UserError(f"PPO job {job_id} saved no policy version: its rollouts cannot be labeled")


def queue_rollouts(store: Store, job_id: int, iteration: int, k: int, sample_more: SampleMore) -> tuple[int, int]:
    """Put one iteration's rollouts in the labeling queue: per prompt, its
    rollouts and as many more completions from the same policy version as make
    K (``sample_more``), stored as that version's samples so that they wait as
    one set to label. Returns (sets queued, completions sampled)."""
    rows = store.rollouts(job_id, iteration)
    if not rows:
        kept = store.rollout_iterations(job_id)
        span = f"iterations {kept[0]}-{kept[-1]}" if kept else "none"
        raise UserError(f"PPO job {job_id} kept no rollouts of iteration {iteration} (kept: {span})")
    version = rows[0].policy_version
    if version is None:
        raise UserError(f"the policy that sampled iteration {iteration} was never saved as a version "
                        "(--save-every): queue an iteration that follows a saved one")
    params = session_sampling(store, job_id)
    groups: dict[str, list[RolloutRow]] = {}
    for row in rows:
        groups.setdefault(row.prompt, []).append(row)
    sampled = 0
    for prompt, group in groups.items():
        more = sample_more(prompt, version, k - len(group)) if len(group) < k else []
        sampled += len(more)
        prompt_id = store.add_prompt(prompt, source="rollouts")
        store.add_completions(prompt_id, [_completion(r, params, version) for r in group[:k]]
                              + [s.as_row(params, version) for s in more])
    return len(groups), sampled


def _completion(row: RolloutRow, params: SamplingParams, version: int) -> dict[str, Any]:
    """A rollout as a row of the store's ``completions`` table."""
    return {"text": row.completion, "token_ids": row.token_ids, "n_tokens": row.n_tokens,
            "finish_reason": row.finish_reason, "policy_version": version, "temperature": params.temperature,
            "top_p": params.top_p, "max_new_tokens": params.max_new_tokens}
