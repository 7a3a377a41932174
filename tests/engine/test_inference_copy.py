"""Sampling from the merged inference copy (rlhf.inference_copy) answers as the
training path does: the same tokens for the same seed, log-probs that teacher
forcing reads back, for every role, on full and 4-bit bases, and it follows the
adapter as it changes."""

from __future__ import annotations

import pytest
import torch

from rlhf.model_options import ModelOptions
from rlhf.models import load_stack
from rlhf.sampling import SamplingParams, sample_k
from rlhf.tokens import teacher_forced_logprobs

PROMPTS = ["short", "a longer prompt, so that the other one is left-padded"]


def _perturb(stack, adapter: str, seed: int) -> None:
    """A trained-looking adapter: LoRA B away from zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in stack.adapter_parameters(adapter):
            p.add_(0.05 * torch.randn(p.shape, generator=generator))


def _both_paths(stack, role: str):
    params = SamplingParams(temperature=0.7, top_p=1.0, max_new_tokens=8, seed=3)
    stack.fast_sampling = True
    fast = sample_k(stack, PROMPTS, 2, params, role=role)
    stack.fast_sampling = False
    slow = sample_k(stack, PROMPTS, 2, params, role=role)
    stack.fast_sampling = True
    return [s for row in fast for s in row], [s for row in slow for s in row]


@pytest.mark.parametrize("quantize", [False, True])
def test_the_copy_answers_as_the_training_path_for_every_role(tiny_dir, quantize):
    torch.manual_seed(0)
    stack = load_stack(ModelOptions(source=tiny_dir, quantize=quantize, device="cpu", dtype="float32"))
    assert stack.fast_sampling
    _perturb(stack, "policy", 1)
    for role in ("policy", "base"):
        fast, slow = _both_paths(stack, role)
        assert [s.token_ids for s in fast] == [s.token_ids for s in slow], role
        for a, b in zip(fast, slow):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    # What it samples is what PPO recomputes for the policy.
    for sample in _both_paths(stack, "policy")[0]:
        [recomputed] = teacher_forced_logprobs(stack, "policy", sample.prompt_ids, [sample.token_ids], 0.7)
        assert recomputed == pytest.approx(sample.logprobs, abs=1e-4)


def test_the_copy_follows_the_adapter_as_it_changes(tiny_stack):
    before, _ = _both_paths(tiny_stack, "policy")
    _perturb(tiny_stack, "policy", 2)  # as an optimizer step would, in place
    after, slow = _both_paths(tiny_stack, "policy")
    assert [s.logprobs for s in after] != [s.logprobs for s in before]
    assert [s.token_ids for s in after] == [s.token_ids for s in slow]
    tiny_stack.reset_policy()
    reset, slow = _both_paths(tiny_stack, "policy")
    base, _ = _both_paths(tiny_stack, "base")
    assert [s.token_ids for s in reset] == [s.token_ids for s in base] == [s.token_ids for s in slow]
