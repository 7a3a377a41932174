"""The real embedded model (SmolLM2-135M-Instruct): converted once, then answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.model_options import ModelOptions
from rlhf.models import load_stack, resolve_model_dir
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


def test_a_gguf_file_is_converted_once_and_reused(tmp_path, monkeypatch):
    """--model path/to/file.gguf: converted into the cache on first use, then read from there."""
    from rlhf.models import embedded_gguf_path

    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path / "cache"))
    gguf = embedded_gguf_path()
    first = resolve_model_dir(str(gguf))
    assert (tmp_path / "cache") in Path(first).parents
    marker = Path(first) / "model.safetensors"
    stamp = marker.stat().st_mtime_ns
    assert resolve_model_dir(str(gguf)) == first
    assert marker.stat().st_mtime_ns == stamp  # not converted again


def test_an_adapter_loaded_after_sampling_leaves_the_4bit_base_intact(tmp_path):
    """Loading a policy version or the drift view adds an adapter after the model has
    sampled. With bitsandbytes' repacked CPU weights every role then answered
    gibberish; the base must compute what it computed before."""
    import torch

    stack = load_stack(ModelOptions(device="cpu"))
    ids = torch.tensor([stack.tokenizer("The capital of France is")["input_ids"]])
    mask = torch.ones_like(ids)

    def base_logits() -> torch.Tensor:
        with torch.no_grad(), stack.role("base"):
            return stack.logits(stack.hidden(ids, mask))

    saved = stack.save_adapter("policy", tmp_path / "policy")
    sample_k(stack, ["Say hello."], 1, SamplingParams(max_new_tokens=4, seed=0))
    before = base_logits()
    stack.load_adapter("drift", saved, heads=False)
    assert torch.allclose(base_logits(), before, atol=1e-3)
