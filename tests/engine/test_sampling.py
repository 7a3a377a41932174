"""Sampling on the tiny model: K rows, finish reasons, log-probs, no prompt echo."""

from __future__ import annotations

import pytest
import torch

from rlhf.chat import chat_prompt_ids
from rlhf.sampling import SamplingParams, sample_k
from rlhf.tokens import left_pad


def test_pad_token_is_not_eos(tiny_stack):
    tok = tiny_stack.tokenizer
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"


def test_k_completions_per_prompt_in_prompt_order(tiny_stack):
    prompts = ["Say hi.", "Name a colour, any colour you like, and say why."]
    out = sample_k(tiny_stack, prompts, 3, SamplingParams(max_new_tokens=6, seed=1))
    assert [len(row) for row in out] == [3, 3]
    for prompt, row in zip(prompts, out):
        expected = chat_prompt_ids(tiny_stack.tokenizer, prompt)
        for s in row:
            assert s.prompt_ids == expected
            assert 1 <= s.n_tokens <= 6
            assert len(s.logprobs) == s.n_tokens
            assert s.finish_reason in ("eos", "length")


def test_prompt_is_not_echoed_into_the_completion(tiny_stack):
    marker = "zebra-marker-17"
    [[s]] = sample_k(tiny_stack, [marker], 1, SamplingParams(max_new_tokens=8, seed=0))
    assert marker not in s.text
    assert "<|im_start|>" not in s.text
    assert s.n_tokens <= 8  # the prompt's tokens are not counted as completion


def _force_eos_on_even_rows(stack):
    """Make rows 0, 2, ... of a batch emit EOS at their second token; odd rows run to
    the length limit. The K rows of one prompt share its first pass (one row,
    rlhf.decode), so the first token is never EOS."""
    eos = stack.tokenizer.eos_token_id

    def hook(_module, _inputs, logits):
        logits = logits.clone()
        if logits.shape[0] == 1:
            logits[..., eos] -= 50.0
            return logits
        logits[0::2, :, eos] += 50.0
        logits[1::2, :, eos] -= 50.0
        return logits

    return stack.lm_head.register_forward_hook(hook)


def test_finish_reasons_and_eos_handling(tiny_stack):
    tiny_stack.fast_sampling = False  # the hook steers the training path's LM head, not the inference copy's
    handle = _force_eos_on_even_rows(tiny_stack)
    try:
        [row] = sample_k(tiny_stack, ["Stop or go on?"], 4, SamplingParams(max_new_tokens=5, seed=0))
    finally:
        handle.remove()
    eos = tiny_stack.tokenizer.eos_token_id
    assert [s.finish_reason for s in row] == ["eos", "length", "eos", "length"]
    for s in row[0::2]:
        assert len(s.token_ids) == 2 and s.token_ids[-1] == eos  # EOS kept in the ids: the model must learn it
        assert s.text == tiny_stack.tokenizer.decode(s.token_ids[:1], skip_special_tokens=True).strip()  # not in the text
        assert s.logprobs[1] == pytest.approx(0.0, abs=1e-4)
    for s in row[1::2]:
        assert s.n_tokens == 5 and eos not in s.token_ids


def test_logprobs_are_from_temperature_scaled_logits(tiny_stack):
    """Recomputing log p(token) from a fresh forward pass at the same temperature
    gives the recorded numbers: PPO's ratio and KL depend on it."""
    params = SamplingParams(temperature=0.5, top_p=0.9, max_new_tokens=6, seed=3)
    rows = sample_k(tiny_stack, ["short", "a much longer prompt that forces left padding of the other"], 2, params)
    samples = [s for row in rows for s in row]
    seqs = [s.prompt_ids + s.token_ids for s in samples]
    ids, mask = left_pad(seqs, tiny_stack.tokenizer.pad_token_id)
    with torch.no_grad(), tiny_stack.role("policy"):
        logits = tiny_stack.logits(tiny_stack.hidden(ids, mask)) / params.temperature
    logp = torch.log_softmax(logits, dim=-1)
    width = ids.shape[1]
    for i, s in enumerate(samples):
        n = s.n_tokens
        positions = range(width - n - 1, width - 1)  # logits at t predict token t+1
        recomputed = [logp[i, t, ids[i, t + 1]].item() for t in positions]
        assert recomputed == pytest.approx(s.logprobs, abs=2e-3)


def test_invalid_sampling_params_are_refused():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)


def test_sample_rows_fit_the_store(tiny_stack, store):
    params = SamplingParams(max_new_tokens=4, seed=0)
    [row] = sample_k(tiny_stack, ["p"], 2, params)
    pid = store.add_prompt("p")
    ids = store.add_completions(pid, [s.as_row(params, 0) for s in row])
    stored = store.completions(ids)
    assert [c.token_ids for c in stored] == [s.token_ids for s in row]
    for c, s in zip(stored, row):
        assert c.logprobs == pytest.approx(s.logprobs)
    assert all(c.policy_version == 0 for c in stored)
