"""A batch of PPO experience: what a rollout samples, scores and freezes, the
rewards PPO can maximize, and a batch on disk beside the version it trained.

A reward is anything with ``score_ids`` (``Scorer``): a trained reward model
(``rlhf.reward_scoring.RewardScorer``) or a rule (``RuleScorer``). The log-probs
and values come from one teacher-forced pass per role (``rlhf.tokens``), at the
sampling temperature, so the ratio and the KL are measured where sampling happened.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from rlhf.chat import chat_prompt_ids
from rlhf.model_stack import ModelStack
from rlhf.ppo_config import PPOConfig
from rlhf.rules import parse_rule
from rlhf.sampling import Sample, SamplingParams, generate
from rlhf.tokens import completion_batch, completion_forward

ROLLOUTS_FILE = "rollouts.json"


class Scorer(Protocol):
    """What PPO needs of a reward: one score per completion. ``rlhf.reward_scoring.RewardScorer``
    is one (it also offers ``renormalize``); a rule (``RuleScorer``) is another."""

    def score_ids(self, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                  finished: list[bool]) -> torch.Tensor: ...


# --- rule-based rewards: for tests and demos, no reward model needed --------------


@dataclass
class RuleScorer:
    """A reward computed by a rule (rlhf.rules) from each completion's text and ids."""

    name: str
    rule: Callable[[str, Sequence[int], bool], float]
    decode: Callable[[list[int]], str] | None = None  # ids -> text, for the rules that read text

    def score_ids(self, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                  finished: list[bool]) -> torch.Tensor:
        scores = [self.rule(self.decode(ids) if self.decode else "", ids, done)
                  for ids, done in zip(completion_ids, finished)]
        return torch.tensor(scores, dtype=torch.float32)


def rule_scorer(spec: str, eos_id: int | None, max_new_tokens: int,
                decode: Callable[[list[int]], str] | None = None) -> RuleScorer:
    """A rule reward from ``rule:NAME[=ARG]`` (rlhf.rules lists them): ``rule:short``
    (short answers that end in EOS), ``rule:distinct`` and ``rule:ids-below=N``
    (dense token-level signals even a small random model can follow), or any text
    rule the scripted labeler takes, such as ``rule:contains=WORD``."""
    return RuleScorer(spec, parse_rule(spec, eos_id=eos_id, budget=max_new_tokens, what="reward rule"), decode)


# --- one batch of experience --------------------------------------------------------


@dataclass
class Rollout:
    """A batch sampled from pi_bar with everything PPO freezes before updating."""

    prompts: list[str]
    samples: list[Sample]
    ids: torch.Tensor            # [B, Q+T] left-padded prompt + right-padded completion
    attention: torch.Tensor      # [B, Q+T]
    context: int                 # Q: completion tokens start here
    tokens: torch.Tensor         # [B, T] completion ids (pad after the end)
    mask: torch.Tensor           # [B, T] 1 on completion tokens, EOS included
    scores: torch.Tensor         # [B]
    spread: torch.Tensor         # [B] the reward ensemble's disagreement (std over heads); 0 for one head or a rule
    logprobs: torch.Tensor       # [B, T] pi_bar, at the temperature
    ref_logprobs: torch.Tensor   # [B, T]
    values: torch.Tensor         # [B, T]
    rewards: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    kl: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    advantages: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    returns: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    seconds: dict[str, float] = field(default_factory=dict)  # where the rollout's time went, by stage

    def rows(self) -> list[dict[str, Any]]:
        """The batch as the store keeps it and the live table shows it: prompt,
        completion, score and the ensemble's spread, sequence KL, how it ended."""
        kl = self.kl.sum(1).tolist() if self.kl.numel() else [0.0] * len(self.samples)
        return [{"prompt": p, "completion": s.text, "score": float(sc), "spread": float(sp), "kl": float(k),
                 "finish_reason": s.finish_reason, "n_tokens": s.n_tokens, "token_ids": s.token_ids}
                for p, s, sc, sp, k in zip(self.prompts, self.samples, self.scores.tolist(), self.spread.tolist(),
                                           kl)]


@torch.no_grad()
def collect_rollout(stack: ModelStack, prompts: Sequence[str], config: PPOConfig, sampling: SamplingParams,
                    score: Callable[[list[list[int]], Sequence[Sample]], tuple[torch.Tensor, torch.Tensor]]
                    ) -> Rollout:
    """Steps 1-2 of an iteration: sample a completion per prompt from the policy
    (pi_bar), then, teacher-forced in chunks of ``forward_batch_size``, freeze its
    log-probs, the reference's and the value head's values; ``score`` gives each
    sample its reward and the reward's spread."""
    tok = stack.tokenizer
    clock = time.monotonic()
    prompt_rows = [chat_prompt_ids(tok, p) for p in prompts]
    samples = generate(stack, prompt_rows, sampling, role="policy")
    seconds = {"sample": time.monotonic() - clock}
    clock = time.monotonic()
    layout = completion_batch(prompt_rows, [s.token_ids for s in samples], tok.pad_token_id)
    ids, attention = layout.ids.to(stack.device), layout.attention.to(stack.device)
    tokens, mask = layout.tokens.to(stack.device), layout.mask.float().to(stack.device)
    context = layout.context

    logprobs, ref_logprobs, values = [], [], []
    for rows in _chunks(len(samples), config.forward_batch_size):
        with stack.role("policy"):
            policy = completion_forward(stack, ids[rows], attention[rows], tokens[rows], context, config.temperature)
        logprobs.append(policy.logprobs)
        values.append(policy.values)
        with stack.role("reference"):
            reference = completion_forward(stack, ids[rows], attention[rows], tokens[rows], context,
                                           config.temperature)
        ref_logprobs.append(reference.logprobs)
    seconds["forward"] = time.monotonic() - clock
    clock = time.monotonic()
    scores, spread = score(prompt_rows, samples)
    seconds["score"] = time.monotonic() - clock
    return Rollout(list(prompts), samples, ids, attention, context, tokens, mask, scores.to(stack.device), spread,
                   torch.cat(logprobs) * mask, torch.cat(ref_logprobs) * mask, torch.cat(values) * mask,
                   seconds=seconds)


def _chunks(n: int, size: int) -> Iterator[list[int]]:
    for start in range(0, n, size):
        yield list(range(start, min(n, start + size)))


# --- a batch on disk, beside the policy version it trained ----------------------------


def write_rollouts(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(rows, indent=1))
    tmp.replace(path)  # atomic: the app never reads half a file
