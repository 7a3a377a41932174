"""The 'reward' job: train a reward model on the store's preferences, normalize
it, and save it as a new reward version (``rlhf train-reward``, the Train screen).

The reward model is Bradley–Terry on recorded preferences, in parts:
``rlhf.reward_config`` (its settings and read-out), ``rlhf.reward_data`` (store
pairs as batch elements), ``rlhf.reward_loss`` (the objective),
``rlhf.reward_train`` (the training loop), ``rlhf.reward_scoring`` (scoring with
a saved version, and normalization) and ``rlhf.reward_eval`` (agreement with
labels). This module runs them as a background job, and adds to the saved
version what the Train screen reports beside it: its normalization and whether
its scores, or the labels themselves, follow length.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING

import torch

from rlhf.errors import UserError
from rlhf.reward_config import Readout, RewardJob
from rlhf.reward_data import Element, store_elements
from rlhf.reward_scoring import ADAPTER, normalization_of, score_sequences
from rlhf.reward_train import train
from rlhf.stats import correlation

if TYPE_CHECKING:
    from rlhf.jobs import JobContext
    from rlhf.model_stack import ModelStack
    from rlhf.store import Store


# --- the length check ---------------------------------------------------------------


def completion_scores(stack: ModelStack, elements: Sequence[Element], readout: Readout,
                      batch_size: int = 16) -> tuple[torch.Tensor, list[int]]:
    """Raw scores and token lengths of every distinct completion in ``elements``."""
    lengths: dict[tuple[int, ...], int] = {}
    for e in elements:
        for seq, n in zip(e.sequences, e.lengths):
            lengths.setdefault(tuple(seq), n)
    counts = list(lengths.values())
    return score_sequences(stack, [list(s) for s in lengths], counts, readout, batch_size), counts


def labels_prefer_longer(elements: Sequence[Element]) -> tuple[float | None, int]:
    """How often the labels chose the longer completion, over pairs of unequal
    length: (fraction, pairs counted). Far from 0.5, the taste itself is about
    length, and a reward model will learn length first (Singhal et al. 2023)."""
    longer = decided = 0
    for e in elements:
        for c, r in e.pairs:
            if e.lengths[c] != e.lengths[r]:
                decided += 1
                longer += e.lengths[c] > e.lengths[r]
    return (longer / decided if decided else None), decided


# --- the background job -----------------------------------------------------------------


def check_pairs(store: Store, sources: str, what: str = "to train on") -> int:
    """Refuse, before a process loads a model, to train on no pairs (``what``
    names the training in the message). Returns the count."""
    n = len(store.pairs(source=None if sources == "all" else sources))
    if n == 0:
        which = {"all": "", "label": "labeled ", "import": "imported "}[sources]
        raise UserError(f"no {which}preference pairs {what}: label some comparisons in the workbench "
                        "or `rlhf import FILE`")
    return n


def run_job(ctx: JobContext) -> None:
    """The 'reward' runner of rlhf.jobs: train, normalize, save a new reward version.
    Only reads pairs: a job that fails leaves every label as it was."""
    from rlhf.models import load_stack

    job = RewardJob.from_dict(ctx.config)
    config = job.reward
    stack = load_stack(job.model, progress=print)
    elements = store_elements(ctx.store, stack.tokenizer, sources=config.sources, max_length=config.max_length,
                              max_completion_tokens=config.max_completion_tokens)
    started = time.monotonic()
    result = train(stack, elements, config, log=ctx.log, checkpoint=ctx.checkpoint, set_total=ctx.set_total)
    readout = result.readout or config.readout_for(stack)
    completion_ids = [i for e in elements for i in e.completion_ids]
    meta = {"eval_accuracy": result.eval.accuracy, "eval_margin": result.eval.margin,
            "eval_pairs": result.eval.n_pairs, "eval_loss": result.eval.loss, "eval_elements": result.n_eval,
            "train_elements": result.n_train, "steps": result.steps, "epochs": result.epochs,
            "best_step": result.best_step, "stopped_early": result.stopped_early, "readout": asdict(readout),
            "finetuned": config.finetune, "heads": config.heads,
            "sampling": ctx.store.sampling_definition(completion_ids),
            "seconds": time.monotonic() - started, "sources": config.sources, "max_length": config.max_length,
            "max_completion_tokens": config.max_completion_tokens, "config": config.to_dict()}
    # Saved before anything else can fail: what training cost is never lost.
    # Until the normalization below is recorded, the version scores with gain 1,
    # bias 0; a PPO session renormalizes on its own reference anyway.
    path = ctx.checkpoint_root / f"reward-job-{ctx.job_id}"
    stack.save_adapter(ADAPTER, path, meta=meta)
    version = ctx.store.add_checkpoint("reward", path, job_id=ctx.job_id, meta=meta)
    print(f"saved reward version {version} to {path}")
    # Normalized on the completions it was trained on (no sampling), with the
    # length check: one more scoring pass over them.
    raw, lengths = completion_scores(stack, elements, readout, batch_size=config.batch_size * 4)
    norm = normalization_of(raw)
    longer, decided = labels_prefer_longer(elements)
    meta.update({"gain": norm.gain, "bias": norm.bias, "raw_mean": norm.raw_mean, "raw_std": norm.raw_std,
                 "norm_samples": norm.n_samples, "length_corr": correlation(raw.tolist(), lengths),
                 "labels_prefer_longer": longer, "length_pairs": decided})
    ctx.store.update_checkpoint_meta("reward", version, meta)
