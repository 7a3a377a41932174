"""DPO (Rafailov et al. 2023) on the store's pairs: the pairs as token ids, the
loss, and the training loop; knows nothing of jobs (``rlhf.dpo`` runs it as one).

    loss = -log sigmoid(beta * [(log pi(c) - log pi_ref(c)) - (log pi(r) - log pi_ref(r))])

log pi(y) is the sum of the log-probs of a completion's tokens after its prompt,
at temperature 1 (the policy's own distribution, as DPO defines it), read the
one teacher-forced way (``rlhf.tokens``). The metric names are TRL DPOTrainer's.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from rlhf.chat import chat_prompt_ids
from rlhf.dpo_config import DPOConfig
from rlhf.model_stack import ModelStack
from rlhf.reward_data import split_by_prompt
from rlhf.store import Store
from rlhf.tokens import completion_batch, completion_forward


@dataclass
class Pair:
    """One labeled preference as token ids."""

    prompt: str
    prompt_ids: list[int]
    chosen: list[int]
    rejected: list[int]


def store_pairs(store: Store, tokenizer: Any, *, sources: str = "label", max_completion_tokens: int = 256) -> list[Pair]:
    """The store's pairs as DPO reads them: a sampled completion as its tokens were
    sampled (EOS only where the model emitted it: DPO trains the policy's own
    likelihood, and an EOS it never chose would teach it to stop there); an
    imported answer, whole, as its text's tokens and EOS."""
    rows = store.pairs(source=None if sources == "all" else sources)
    completions = {c.id: c for c in store.completions(sorted({i for r in rows for i in (r["chosen_id"],
                                                                                          r["rejected_id"])}))}
    prompts: dict[str, list[int]] = {}

    def tokens(cid: int, text: str) -> list[int]:
        sampled = completions[cid].token_ids if cid in completions else None
        ids = list(sampled) if sampled else tokenizer(text, add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id]
        return ids[:max_completion_tokens]

    pairs = []
    for row in rows:
        prompt = row["prompt"]
        if prompt not in prompts:
            prompts[prompt] = chat_prompt_ids(tokenizer, prompt)
        pairs.append(Pair(prompt, prompts[prompt], tokens(row["chosen_id"], row["chosen"]),
                          tokens(row["rejected_id"], row["rejected"])))
    return pairs


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The sigmoid DPO loss over a batch of pairs (sequence log-probs in), and its
    implicit rewards beta * log(pi / pi_ref) of the chosen and rejected answers."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen - rejected).mean()
    with torch.no_grad():
        stats = {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
                 "rewards/accuracies": (chosen > rejected).float().mean(),
                 "rewards/margins": (chosen - rejected).mean(),
                 "logps/chosen": policy_chosen.mean(), "logps/rejected": policy_rejected.mean()}
    return loss, stats


def sequence_logprobs(stack: ModelStack, prompts: Sequence[Sequence[int]],
                      completions: Sequence[Sequence[int]]) -> torch.Tensor:
    """Summed log pi(completion | prompt) of each row under the active role; differentiable."""
    batch = completion_batch(prompts, completions, stack.tokenizer.pad_token_id)
    mask = batch.mask.to(stack.device)
    logprobs = completion_forward(stack, batch.ids.to(stack.device), batch.attention.to(stack.device),
                                  batch.tokens.to(stack.device), batch.context, 1.0).logprobs
    return (logprobs * mask).sum(1)


def pair_logprobs(stack: ModelStack, pairs: Sequence[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) sequence log-probs of each pair, in one forward pass."""
    both = sequence_logprobs(stack, [p.prompt_ids for p in pairs] * 2,
                             [p.chosen for p in pairs] + [p.rejected for p in pairs])
    return both[:len(pairs)], both[len(pairs):]


@torch.no_grad()
def reference_logprobs(stack: ModelStack, pairs: Sequence[Pair], batch_size: int) -> list[tuple[float, float]]:
    """The reference's log-probs of every pair, once: the reference never changes."""
    out: list[tuple[float, float]] = []
    with stack.role("reference"):
        for start in range(0, len(pairs), batch_size):
            chosen, rejected = pair_logprobs(stack, pairs[start:start + batch_size])
            out += list(zip(chosen.tolist(), rejected.tolist()))
    return out


@dataclass
class DPOResult:
    steps: int
    n_train: int
    n_eval: int
    eval_accuracy: float | None


def train_dpo(stack: ModelStack, pairs: Sequence[Pair], config: DPOConfig, *,
              log: Callable[[int, dict[str, float]], None] = lambda step, metrics: None,
              checkpoint: Callable[[], None] = lambda: None,
              set_total: Callable[[int], None] = lambda n: None,
              on_epoch: Callable[[int, dict[str, float]], dict[str, float]] = lambda epoch, held: {}) -> DPOResult:
    """Epochs of Adam steps on the policy adapter over the training pairs. After
    each epoch the held-out pairs' loss and accuracy go to ``on_epoch`` (the job
    measures the KL and saves a version there), and what it returns is logged
    with them at the epoch's last step, in one row set (a follower never sees a
    step half written)."""
    train, held = split_by_prompt(pairs, config.eval_fraction)  # by prompt, as the reward model's split
    if not train:  # one prompt, held out: train on it, with no held-out figure
        train, held = list(pairs), []
    set_total(-(-len(train) // config.batch_size) * config.epochs)
    params = stack.adapter_parameters("policy")
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=config.learning_rate)
    ref = dict(zip(map(id, pairs), reference_logprobs(stack, pairs, config.batch_size)))
    rng = random.Random(config.seed)
    step, held_accuracy = 0, None
    for epoch in range(1, config.epochs + 1):
        order = list(train)
        rng.shuffle(order)
        metrics: dict[str, float] = {}
        for start in range(0, len(order), config.batch_size):
            checkpoint()
            batch = order[start:start + config.batch_size]
            ref_chosen, ref_rejected = (torch.tensor([ref[id(p)][i] for p in batch], device=stack.device)
                                        for i in (0, 1))
            with stack.role("policy"):
                chosen, rejected = pair_logprobs(stack, batch)
            loss, stats = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, config.beta)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            if metrics:  # the step before: the epoch's last is logged with the epoch's figures
                log(step, metrics)
            step += 1
            metrics = {"loss": float(loss.detach()), "epoch": epoch, **{k: float(v) for k, v in stats.items()}}
        held_metrics = evaluate_pairs(stack, held, ref, config) if held else {}
        held_accuracy = held_metrics.get("eval/rewards/accuracies", held_accuracy)
        log(step, {**metrics, **held_metrics, **on_epoch(epoch, held_metrics)})
    for p in params:
        p.requires_grad_(False)
    return DPOResult(steps=step, n_train=len(train), n_eval=len(held), eval_accuracy=held_accuracy)


@torch.no_grad()
def evaluate_pairs(stack: ModelStack, pairs: Sequence[Pair], ref: dict[int, tuple[float, float]],
                   config: DPOConfig) -> dict[str, float]:
    """DPO's loss and implicit-reward accuracy on pairs it did not train on."""
    chosen, rejected = [], []
    with stack.role("policy"):
        for start in range(0, len(pairs), config.batch_size):
            c, r = pair_logprobs(stack, pairs[start:start + config.batch_size])
            chosen.append(c)
            rejected.append(r)
    ref_chosen = torch.tensor([ref[id(p)][0] for p in pairs], device=stack.device)
    ref_rejected = torch.tensor([ref[id(p)][1] for p in pairs], device=stack.device)
    loss, stats = dpo_loss(torch.cat(chosen), torch.cat(rejected), ref_chosen, ref_rejected, config.beta)
    return {"eval/loss": float(loss), **{f"eval/{k}": float(v) for k, v in stats.items()},
            "eval/pairs": float(len(pairs))}
