"""The sampling loop (rlhf.decode) answers as transformers' generate would."""

from __future__ import annotations

import pytest
import torch

from rlhf.chat import chat_prompt_ids
from rlhf.decode import draw, sample_continuations, top_p_filter
from rlhf.tokens import left_pad


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.999, 1.0])
def test_top_p_keeps_what_transformers_keeps(top_p):
    from transformers.generation.logits_process import TopPLogitsWarper

    scores = torch.randn(6, 500, generator=torch.Generator().manual_seed(0)) * 3
    expected = TopPLogitsWarper(top_p)(None, scores.clone()) if top_p < 1 else scores
    assert torch.equal(torch.isinf(top_p_filter(scores.clone(), top_p)), torch.isinf(expected))


def test_draw_follows_each_rows_distribution_and_never_draws_a_zero():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0] * 5 + [1.0]])
    torch.manual_seed(0)
    drawn = torch.stack([draw(probs) for _ in range(20000)])
    assert drawn[:, 1].eq(0).all() and drawn[:, 2].eq(5).all()
    counts = torch.bincount(drawn[:, 0], minlength=6) / len(drawn)
    assert counts[[0, 2, 5]].sum() == 0
    assert torch.allclose(counts, probs[0], atol=0.015)  # 20000 draws: 3.5 standard errors of 0.5


def test_each_sampled_token_has_the_log_prob_of_its_row_read_alone(tiny_stack):
    """Prompts of different lengths in one batch: the padding, the positions and the
    cache give each row what it gets alone, teacher-forced in one pass."""
    tok = tiny_stack.tokenizer
    rows = [chat_prompt_ids(tok, p) for p in ("Hi", "Tell me a long story about the sea and the salt in it", "Hi")]
    ids, mask = left_pad(rows, tok.pad_token_id)
    model = tiny_stack.sampling_model("policy")
    batches: list[int] = []
    handle = model.register_forward_pre_hook(lambda _m, _a, kw: batches.append(kw["input_ids"].shape[0]),
                                             with_kwargs=True)
    torch.manual_seed(0)
    try:
        out = sample_continuations(model, ids, mask, temperature=0.7, top_p=1.0, max_new_tokens=12,
                                   eos=tok.eos_token_id, pad=tok.pad_token_id, min_new_tokens=12)
    finally:
        handle.remove()
    assert batches[0] == 2 and set(batches[1:]) == {3}  # the repeated prompt read once, then three answers
    assert out.tokens.shape == (3, 12) and len(set(out.tokens[1].tolist())) > 1
    for row, prompt in enumerate(rows):
        full = torch.tensor([prompt + out.tokens[row].tolist()])
        with torch.no_grad():
            logits = model(input_ids=full).logits[0, len(prompt) - 1:-1].float()
        alone = torch.log_softmax(logits / 0.7, -1).gather(1, out.tokens[row][:, None]).squeeze(1)
        assert torch.allclose(out.logprobs[row], alone, atol=1e-4)


def test_rows_end_at_eos_and_the_loop_at_the_last_or_when_told(tiny_stack):
    tok = tiny_stack.tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id
    ids, mask = left_pad([chat_prompt_ids(tok, "Hi")] * 3, pad)
    model = tiny_stack.sampling_model("policy")
    def eos_first(_module, _args, logits):  # every row ends at once, whatever the hidden state
        logits[..., eos] += 50.0
        return logits

    hook = model.lm_head.register_forward_hook(eos_first)
    try:
        out = sample_continuations(model, ids, mask, temperature=1.0, top_p=1.0, max_new_tokens=8, eos=eos, pad=pad)
        assert out.tokens.tolist() == [[eos]] * 3
        held = sample_continuations(model, ids, mask, temperature=1.0, top_p=1.0, max_new_tokens=8, eos=eos,
                                    pad=pad, min_new_tokens=3)
        assert held.tokens.shape[1] == 4 and (held.tokens[:, :3] != eos).all() and (held.tokens[:, 3] == eos).all()
    finally:
        hook.remove()
    asked = []
    cut = sample_continuations(model, ids, mask, temperature=1.0, top_p=1.0, max_new_tokens=8, eos=eos, pad=pad,
                               min_new_tokens=8, should_stop=lambda: asked.append(1) or len(asked) >= 2)
    assert cut.tokens.shape[1] == 2
