"""The real embedded model (SmolLM2-135M-Instruct): converted once, then answers."""

from __future__ import annotations

import pytest

from rlhf.models import ModelOptions, load_stack, resolve_model_dir
from rlhf.sampling import SamplingParams, sample_k

pytestmark = pytest.mark.slow


def test_embedded_model_loads_in_4bit_and_answers():
    resolve_model_dir("embedded")  # the one-time conversion, not timed
    stack = load_stack(ModelOptions(device="cpu"))
    assert stack.quantized
    [row] = sample_k(stack, ["What is the capital of France? Answer in one sentence."], 4,
                     SamplingParams(max_new_tokens=48, seed=0))
    assert any("Paris" in s.text for s in row), [s.text for s in row]
    assert any(s.finish_reason == "eos" for s in row)
