"""A prompt shared by several completions is read once (rlhf.shared_prompt), and
every completion's reward is still the one it gets alone."""

from __future__ import annotations

import random

import pytest
import torch

from rlhf.chat import chat_prompt_ids
from rlhf.reward_config import Readout
from rlhf.reward_scoring import features
from rlhf.shared_prompt import fit_rows, pack_shared_prompts, prompt_groups


def sequences_of(tok, rng: random.Random) -> tuple[list[list[int]], list[int]]:
    """Three prompts of different lengths with 3, 1 and 4 completions of different
    lengths, one completion repeated, and a last prompt that is only its EOS."""
    eos = tok.eos_token_id
    seqs, lengths = [], []
    for prompt, k in (("Tell me a story about a dragon and a knight who", 3), ("Hi", 1), ("Why is the sky blue?", 4)):
        p = chat_prompt_ids(tok, prompt)
        bodies = [[rng.randrange(100, 5000) for _ in range(rng.randrange(1, 30))] + [eos] for _ in range(k)]
        if k == 4:
            bodies[2] = list(bodies[0])
        for b in bodies:
            seqs.append(p + b)
            lengths.append(len(b))
    seqs.append([eos])
    lengths.append(1)
    return seqs, lengths


def test_packing_groups_neighbours_by_prompt_and_reads_each_prompt_once(tiny_stack):
    seqs, lengths = sequences_of(tiny_stack.tokenizer, random.Random(0))
    assert prompt_groups(seqs, lengths) == [[0, 1, 2], [3], [4, 5, 6, 7], [8]]
    packed = pack_shared_prompts(seqs, lengths, tiny_stack.tokenizer.pad_token_id)
    widths = [len(seqs[g[0]]) - lengths[g[0]] + sum(lengths[i] for i in g) for g in prompt_groups(seqs, lengths)]
    # Four blocks, as wide as the widest; the short ones share a row.
    assert packed.ids.shape == (len(fit_rows(widths)), max(widths)) and packed.ids.shape[0] < 4
    prompts = sum(len(seqs[g[0]]) - lengths[g[0]] for g in prompt_groups(seqs, lengths))
    assert int((packed.allowed.diagonal(dim1=1, dim2=2) & (packed.ids != tiny_stack.tokenizer.pad_token_id)).sum()) \
        == prompts + sum(lengths)
    # Each completion sits whole in its row, where its sequence ends.
    for i, s in enumerate(seqs):
        r, a, n = int(packed.row[i]), int(packed.start[i]), int(packed.length[i])
        assert packed.ids[r, a:a + n].tolist() == s[len(s) - n:]
        assert packed.positions[r, a:a + n].tolist() == list(range(len(s) - n, len(s)))


@pytest.mark.parametrize("pool", ["eos", "mean"])
def test_packed_features_equal_each_sequence_read_alone(tiny_stack, pool):
    tiny_stack.ensure_adapter("reward")
    seqs, lengths = sequences_of(tiny_stack.tokenizer, random.Random(1))
    readout = Readout(layer=tiny_stack.depth, pool=pool)
    with tiny_stack.role("reward"), torch.no_grad():
        together = features(tiny_stack, seqs, lengths, readout)
        alone = torch.cat([features(tiny_stack, [s], [n], readout) for s, n in zip(seqs, lengths)])
    assert together.shape == alone.shape
    assert torch.allclose(together, alone, atol=1e-4), (together - alone).abs().max()


def test_rows_are_filled_first_fit_by_decreasing_width():
    assert fit_rows([10, 3, 7, 4, 6]) == [[0], [2, 1], [4, 3]]
    assert sorted(g for r in fit_rows([5, 5, 5]) for g in r) == [0, 1, 2]


def test_gradients_through_a_shared_prompt_equal_those_of_separate_rows(tiny_stack):
    """Training reads the prompt once; the adapter's gradient is the same sum."""
    tiny_stack.ensure_adapter("reward")
    params = tiny_stack.adapter_parameters("reward")
    with torch.no_grad():
        for p in params:
            p.normal_(std=0.05)  # LoRA's B starts at zero: give the gradient something to flow through
    seqs, lengths = sequences_of(tiny_stack.tokenizer, random.Random(2))
    readout = Readout(layer=tiny_stack.depth, pool="mean")
    grads = []
    for rows in ([list(range(len(seqs)))], [[i] for i in range(len(seqs))]):
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        with tiny_stack.role("reward"):
            total = sum(features(tiny_stack, [seqs[i] for i in r], [lengths[i] for i in r], readout).sum()
                        for r in rows)
        total.backward()
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    assert torch.allclose(grads[0], grads[1], atol=1e-4, rtol=1e-3)
