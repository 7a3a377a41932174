"""Sampling K completions per prompt in one batch (the token loop is rlhf.decode;
a prompt shared by its K rows is read once).

Prompts go through the model's chat template and are left-padded (generation
continues from the right edge of every row). The pad token differs from EOS, so
a completion's EOS is a real token the policy can learn to emit. Each sample
keeps the log-probs of its sampled tokens computed from the logits divided by the
sampling temperature: the same numbers PPO later recomputes for its ratio and KL.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from rlhf.chat import chat_prompt_ids
from rlhf.model_stack import ModelStack
from rlhf.sampling_params import SamplingParams  # noqa: F401  (re-exported: the definition lives there)
from rlhf.decode import sample_continuations
from rlhf.tokens import left_pad


@dataclass
class Sample:
    """One sampled completion."""

    text: str
    token_ids: list[int]          # sampled ids, EOS included when emitted
    logprobs: list[float]         # log p(token) at the sampling temperature
    finish_reason: str            # 'eos' | 'length'
    prompt_ids: list[int] = field(default_factory=list, repr=False)

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    def as_row(self, params: SamplingParams, policy_version: int, *, best_of: int | None = None,
               reward_version: int | None = None) -> dict[str, Any]:
        """The columns of the store's ``completions`` table (``best_of``: picked by
        reward model ``reward_version`` among that many samples)."""
        return {
            "text": self.text, "token_ids": self.token_ids, "n_tokens": self.n_tokens,
            "finish_reason": self.finish_reason, "policy_version": policy_version,
            "temperature": params.temperature, "top_p": params.top_p,
            "max_new_tokens": params.max_new_tokens, "logprobs": self.logprobs,
            "best_of": best_of, "reward_version": reward_version,
        }


@torch.no_grad()
def generate(stack: ModelStack, prompt_rows: Sequence[Sequence[int]], params: SamplingParams,
             role: str = "policy", should_stop: Callable[[], bool] | None = None,
             min_new_tokens: int = 0) -> list[Sample]:
    """Sample one completion per row of prompt ids, batched (rlhf.decode). ``should_stop``
    is asked after every token; when it says True, generation ends early (the app
    quitting mid-sample) and the samples are cut short: discard them.
    ``min_new_tokens`` holds EOS back (benchmarks: the same work every run)."""
    tok = stack.tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id
    samples: list[Sample] = []
    for start in range(0, len(prompt_rows), params.batch_size):
        chunk = prompt_rows[start:start + params.batch_size]
        ids, mask = left_pad(chunk, pad)
        ids, mask = ids.to(stack.device), mask.to(stack.device)
        model = stack.sampling_model(role)
        with stack.role(role) if model is stack.peft else nullcontext():
            # Log-probs from raw logits / temperature: the distribution the token was
            # drawn from before top-p truncation, as PPO recomputes it (DESIGN.md).
            new, logp = sample_continuations(
                model, ids, mask, temperature=params.temperature, top_p=params.top_p,
                max_new_tokens=params.max_new_tokens, eos=eos, pad=pad, should_stop=should_stop,
                min_new_tokens=min_new_tokens)
        for row, prompt in enumerate(chunk):
            token_ids = new[row].tolist()
            if eos in token_ids:
                n = token_ids.index(eos) + 1
                finish = "eos"
            else:
                n = len(token_ids)
                finish = "length"
            token_ids = token_ids[:n]
            body = token_ids[:-1] if finish == "eos" else token_ids
            samples.append(Sample(
                text=tok.decode(body, skip_special_tokens=True).strip(),
                token_ids=token_ids, logprobs=logp[row, :n].tolist(),
                finish_reason=finish, prompt_ids=list(prompt)))
    return samples


def sample_k(stack: ModelStack, prompts: Sequence[str], k: int, params: SamplingParams | None = None,
             role: str = "policy", should_stop: Callable[[], bool] | None = None,
             min_new_tokens: int = 0) -> list[list[Sample]]:
    """K completions for each prompt, all in batched calls of ``generate``.
    Returns one list of K samples per prompt, in prompt order."""
    params = params or SamplingParams()
    if k < 1:
        raise ValueError("k must be at least 1")
    if params.seed is not None:
        torch.manual_seed(params.seed)
    rows = [chat_prompt_ids(stack.tokenizer, p) for p in prompts]
    flat = generate(stack, [r for r in rows for _ in range(k)], params, role=role, should_stop=should_stop,
                    min_new_tokens=min_new_tokens)
    return [flat[i * k:(i + 1) * k] for i in range(len(prompts))]


Sampler = Callable[[Sequence[str], int], list[list[Sample]]]


def params_dict(params: SamplingParams) -> dict[str, Any]:
    return asdict(params)
