"""Scoring with a reward model: its features, its raw rewards, and ``RewardScorer``,
a trained version loaded from the store and read as it was trained.

Normalization: the job maps the scores of the completions it was trained on to
mean 0, std 1 (what the labeling screen shows). A PPO session renormalizes
against its own reference (``RewardScorer.renormalize`` on its first rollout
batch), so that the scores PPO sees start at mean 0, std 1 and β keeps one
meaning across runs (lm-human-preferences ``normalize_after``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from rlhf.chat import chat_prompt_ids
from rlhf.reward_config import Readout, default_layer
from rlhf.reward_data import completion_tokens, join_prompt
from rlhf.shared_prompt import pack_shared_prompts, pool_packed

if TYPE_CHECKING:
    from rlhf.model_stack import ModelStack
    from rlhf.store import Store

ADAPTER = "reward"   # the stack's adapter (and head) that holds the reward model


def features(stack: ModelStack, sequences: Sequence[Sequence[int]], lengths: Sequence[int],
             readout: Readout) -> torch.Tensor:
    """What the reward head reads for each sequence (prompt + completion ending in
    EOS, ``lengths`` = completion tokens). Differentiable; runs under the active role.
    Neighbours with the same prompt share one row, the prompt read once
    (rlhf.shared_prompt); the states are those of each sequence alone."""
    packed = pack_shared_prompts(sequences, lengths, stack.tokenizer.pad_token_id)
    hidden = stack.hidden(packed.ids.to(stack.device), packed.additive_mask(stack.dtype).to(stack.device),
                          layers=readout.layer, position_ids=packed.positions.to(stack.device))
    return pool_packed(hidden, packed, readout.pool)


def raw_rewards(stack: ModelStack, sequences: Sequence[Sequence[int]], lengths: Sequence[int],
                readout: Readout) -> torch.Tensor:
    """r_ψ of each sequence: the mean of the reward heads (one, or an ensemble).
    Differentiable; the caller picks grad or no_grad and must hold stack.role('reward')."""
    return stack.reward_head(features(stack, sequences, lengths, readout)).mean(-1)


@torch.no_grad()
def batched_features(stack: ModelStack, sequences: Sequence[Sequence[int]], lengths: Sequence[int],
                     readout: Readout, batch_size: int = 16) -> torch.Tensor:
    """``features`` of many sequences under the reward role, without gradients (CPU)."""
    out = []
    with stack.role(ADAPTER):
        for start in range(0, len(sequences), batch_size):
            chunk = slice(start, start + batch_size)
            out.append(features(stack, sequences[chunk], lengths[chunk], readout).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, stack.reward_head.in_features)


@torch.no_grad()
def score_sequences(stack: ModelStack, sequences: Sequence[Sequence[int]], lengths: Sequence[int],
                    readout: Readout, batch_size: int = 16) -> torch.Tensor:
    """Raw rewards of many sequences in batches, without gradients (CPU tensor): the
    mean of the reward heads."""
    return head_rewards(stack, sequences, lengths, readout, batch_size).mean(-1)


@torch.no_grad()
def head_rewards(stack: ModelStack, sequences: Sequence[Sequence[int]], lengths: Sequence[int],
                 readout: Readout, batch_size: int = 16) -> torch.Tensor:
    """[sequences, heads]: every reward head's raw reward (their spread is the
    ensemble's uncertainty), without gradients (CPU tensor)."""
    feats = batched_features(stack, sequences, lengths, readout, batch_size)
    return stack.reward_head(feats.to(stack.device)).float().cpu()


class RewardScorer:
    """Scores with the 'reward' adapter + reward head of a ModelStack, read as it was trained."""

    def __init__(self, stack: ModelStack, *, readout: Readout | None = None, gain: float = 1.0, bias: float = 0.0,
                 max_length: int = 512, max_completion_tokens: int = 256,
                 batch_size: int = 16, version: int | None = None) -> None:
        self.stack = stack
        self.readout = readout or Readout(layer=default_layer(stack.depth))
        self.version = version  # the store's reward version, when loaded from one
        self.gain = gain
        self.bias = bias
        self.max_length = max_length
        self.max_completion_tokens = max_completion_tokens
        self.batch_size = batch_size

    def sequences(self, prompt_ids: Sequence[Sequence[int]],
                  completion_ids: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[int]]:
        """Prompt + completion ids with exactly one EOS at the end (appended where
        missing), and each completion's length with its EOS."""
        tok = self.stack.tokenizer
        bodies = [completion_tokens(tok, "", c, max_tokens=self.max_completion_tokens) for c in completion_ids]
        return [join_prompt(p, b, self.max_length) for p, b in zip(prompt_ids, bodies)], [len(b) for b in bodies]

    def raw_ids(self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Unnormalized rewards."""
        sequences, lengths = self.sequences(prompt_ids, completion_ids)
        return score_sequences(self.stack, sequences, lengths, self.readout, self.batch_size)

    def score_ids(self, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                  finished: list[bool]) -> torch.Tensor:
        """Normalized scores gain*r + bias, read as in training (EOS appended where a
        completion has none). Whether an unfinished completion is penalized
        is PPO's setting (rlhf.ppo_math.penalize_missing_eos), not the model's."""
        return self.heads_ids(prompt_ids, completion_ids).mean(-1)

    def heads_ids(self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """[completions, heads]: each reward head's normalized score (the mean is
        ``score_ids``; the spread, the ensemble's uncertainty, on the same scale)."""
        return self.gain * self.raw_heads_ids(prompt_ids, completion_ids) + self.bias

    def raw_heads_ids(self, prompt_ids: Sequence[Sequence[int]],
                      completion_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """[completions, heads]: each head's raw reward, the scale its Bradley–Terry
        probabilities were trained on."""
        sequences, lengths = self.sequences(prompt_ids, completion_ids)
        return head_rewards(self.stack, sequences, lengths, self.readout, self.batch_size)

    def renormalize(self, scores: torch.Tensor) -> Normalization:
        """Fold an affine map into gain and bias so that ``scores`` (this scorer's
        scores of a sample of some policy) become mean 0, std 1. A PPO session
        calls it on its first rollout batch, a sample of its own reference."""
        norm = normalization_of(scores)
        self.gain, self.bias = norm.gain * self.gain, norm.gain * self.bias + norm.bias
        return norm

    def score_texts(self, prompt: str, completions: list[str]) -> list[float]:
        """Normalized scores of completion texts for one prompt (texts count as finished)."""
        tok = self.stack.tokenizer
        prompt_ids = chat_prompt_ids(tok, prompt)
        ids = [tok(c, add_special_tokens=False)["input_ids"] for c in completions]
        return self.score_ids([prompt_ids] * len(ids), ids, [True] * len(ids)).tolist()

    def score_completions(self, prompt: str, completions: Sequence[Any],
                          cache: dict[int, float] | None = None) -> list[float]:
        """Normalized scores of store completions as the model was trained to read
        them: sampled ids when kept, else the text, EOS appended where missing (no
        penalty for a cut completion: this is the model's opinion, shown to the
        labeler and compared with labels). ``cache`` maps completion id -> score."""
        cache = {} if cache is None else cache
        todo = [c for c in completions if c.id not in cache]
        if todo:
            tok = self.stack.tokenizer
            prompt_ids = chat_prompt_ids(tok, prompt)
            ids = [c.token_ids or tok(c.text, add_special_tokens=False)["input_ids"] for c in todo]
            values = self.score_ids([prompt_ids] * len(ids), ids, [True] * len(ids)).tolist()
            cache.update(zip((c.id for c in todo), values))
        return [cache[c.id] for c in completions]


def load_scorer(stack: ModelStack, store: Store, version: int | None = None) -> RewardScorer | None:
    """The latest (or a named) reward checkpoint loaded into the stack; None if none."""
    checkpoint = store.checkpoint("reward", version)
    if checkpoint is None:
        return None
    meta = {**stack.load_adapter(ADAPTER, checkpoint.path), **checkpoint.meta}
    scorer = RewardScorer(stack, readout=Readout.from_meta(meta, stack.depth),
                          gain=float(meta.get("gain", 1.0)), bias=float(meta.get("bias", 0.0)),
                          max_length=int(meta.get("max_length", 512)),
                          max_completion_tokens=int(meta.get("max_completion_tokens", 256)),
                          version=checkpoint.version)
    return scorer


@dataclass
class Normalization:
    """An affine map of raw scores (``gain``, ``bias``) and the sample it was measured on."""

    gain: float
    bias: float
    raw_mean: float
    raw_std: float
    n_samples: int


def normalization_of(scores: torch.Tensor) -> Normalization:
    """Gain and bias that map ``scores`` to mean 0, std 1 (a constant sample keeps
    gain 1: there is no spread to scale)."""
    mean = scores.float().mean().item()
    std = scores.float().std().item() if len(scores) > 1 else 0.0
    gain = 1.0 / std if std > 1e-8 else 1.0
    return Normalization(gain=gain, bias=-gain * mean, raw_mean=mean, raw_std=std, n_samples=len(scores))
