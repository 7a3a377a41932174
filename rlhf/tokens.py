"""Token rows in, per-token log-probs out: how the engine batches ids for the model
and reads log-probs back, in one place, so that every reader gets the same numbers.

- Padding. Prompts are left-padded, so generation continues from the right edge
  of every row and every completion starts at the same column; completions after
  them are right-padded. The reward model packs its sequences instead, a
  shared prompt once (``rlhf.shared_prompt``). The pad token is never EOS (``rlhf.models.load_tokenizer``).
- Positions count from each row's first real token, as ``generate`` counts them
  for left-padded prompts (TRL's ``forward`` does the same), so a teacher-forced
  pass sees every token where sampling saw it.
- log p(token) comes from logits divided by the sampling temperature: the
  distribution the token was drawn from. Sampling records it; PPO's ratio and KL
  and the drift view's log-ratios recompute it teacher-forced
  (``completion_forward``), and the two must agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from rlhf.model_stack import ModelStack


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists into (ids, attention_mask)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids, mask


def right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad id lists: (ids, attention_mask, index of each row's last token).

    Right padding keeps every real token at the position it has alone (the model
    derives positions from the sequence index, not the mask), so a score does not
    depend on what else is in the batch; the causal mask keeps padding after the
    EOS from reaching it."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(list(row), dtype=torch.long)
        mask[i, :len(row)] = 1
    last = torch.tensor([len(r) - 1 for r in rows], dtype=torch.long)
    return ids, mask, last


def position_ids(attention: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token, as ``generate`` counts
    them for left-padded prompts (TRL's ``forward`` does the same)."""
    return (attention.cumsum(1) - 1).clamp(min=0)


@dataclass
class CompletionBatch:
    """Prompts and their completions as one batch: ``[left-padded prompt | right-padded completion]``."""

    ids: torch.Tensor         # [B, Q+T]
    attention: torch.Tensor   # [B, Q+T]
    tokens: torch.Tensor      # [B, T] completion ids, pad after each one's end
    mask: torch.Tensor        # [B, T] 1 on completion tokens (long)
    context: int              # Q: completion tokens start here


def completion_batch(prompt_rows: Sequence[Sequence[int]], completion_rows: Sequence[Sequence[int]],
                     pad_id: int) -> CompletionBatch:
    """One row per (prompt, completion), on the CPU."""
    query, query_mask = left_pad(prompt_rows, pad_id)
    tokens, mask, _ = right_pad(completion_rows, pad_id)
    return CompletionBatch(torch.cat([query, tokens], 1), torch.cat([query_mask, mask], 1), tokens, mask,
                           query.shape[1])


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(token) under ``logits / temperature``: the distribution the token was
    sampled from, so the ratio and the KL are measured where sampling happened
    ("N implementation details of RLHF", detail on temperature)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class TeacherForced(NamedTuple):
    """What one forward pass over prompt + completion gives, at each completion token."""

    logprobs: torch.Tensor   # [B, T] log p(token), at the temperature
    logits: torch.Tensor     # [B, T, V] the raw logits that predict each token
    values: torch.Tensor     # [B, T] the value head's estimate


def completion_forward(stack: ModelStack, ids: torch.Tensor, attention: torch.Tensor, tokens: torch.Tensor,
                       context: int, temperature: float) -> TeacherForced:
    """Teacher-forced pass over a ``CompletionBatch`` (its tensors on the stack's
    device) under whatever role is active: the states at the positions that
    predict each completion token give its log-prob, the logits and the value.
    Gradients flow when the caller allows them."""
    out = stack.body(input_ids=ids, attention_mask=attention, position_ids=position_ids(attention),
                     use_cache=False)
    hidden = out.last_hidden_state[:, context - 1:-1].float()
    logits = stack.logits(hidden)
    values = stack.value_head(hidden).squeeze(-1)
    return TeacherForced(logprobs_from_logits(logits, tokens, temperature), logits, values)


def teacher_forced_logprobs(stack: ModelStack, role: str, prompt_ids: Sequence[int],
                            rows: Sequence[Sequence[int]], temperature: float) -> list[list[float]]:
    """log p(token) of each completion (after the same prompt) under one role."""
    batch = completion_batch([list(prompt_ids)] * len(rows), rows, stack.tokenizer.pad_token_id)
    with torch.no_grad(), stack.role(role):
        logp = completion_forward(stack, batch.ids.to(stack.device), batch.attention.to(stack.device),
                                  batch.tokens.to(stack.device), batch.context, temperature).logprobs
    logp = logp.cpu()
    return [logp[i, :len(r)].tolist() for i, r in enumerate(rows)]
