"""Sequences that share a prompt, packed into one row: the prompt once, then each
completion after it, each attending to the prompt and to itself only.

A comparison's K completions follow one prompt, and in HH-style data the prompt
(a whole dialogue) is most of each sequence: reading it once instead of K times
is most of the reward model's compute. The row's attention mask and positions
make every completion token see exactly what it sees alone (the prompt at
positions 0..P-1, itself from P on), so the states, and the rewards read from
them, are those of the sequences one by one.

Plain padding-free packing (transformers' packed ``position_ids``) separates
whole sequences only; a prompt shared by several needs this tree-shaped mask,
passed to the model as a 4-D mask, which transformers uses as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class PackedRows:
    """Rows of ``[prompt | completion 1 | completion 2 | ...]``, right-padded."""

    ids: torch.Tensor         # [R, T]
    positions: torch.Tensor   # [R, T] each token's position in its own sequence
    allowed: torch.Tensor     # [R, T, T] bool: query token i may attend to key token j
    row: torch.Tensor         # [S] the row each input sequence's completion sits in
    start: torch.Tensor       # [S] the column its completion starts at
    length: torch.Tensor      # [S] its completion's tokens (its last one is at start + length - 1)

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """[R, 1, T, T]: 0 where attention is allowed, the dtype's lowest value elsewhere
        (what both the eager and the SDPA attention of transformers add to the scores)."""
        mask = torch.zeros(self.allowed.shape, dtype=dtype)
        mask.masked_fill_(~self.allowed, torch.finfo(dtype).min)
        return mask[:, None]


def prompt_groups(sequences: Sequence[Sequence[int]], lengths: Sequence[int]) -> list[list[int]]:
    """Indices of the sequences, grouped where neighbours have the same prompt
    (everything before their last ``length`` tokens). Neighbours only: callers list
    a prompt's completions together, and a group stays in input order."""
    groups: list[list[int]] = []
    previous: Sequence[int] | None = None
    for i, (seq, n) in enumerate(zip(sequences, lengths)):
        prompt = seq[:len(seq) - n]
        if groups and previous == prompt:
            groups[-1].append(i)
        else:
            groups.append([i])
        previous = prompt
    return groups


def fit_rows(widths: Sequence[int]) -> list[list[int]]:
    """Groups into rows no wider than the widest group, first-fit by decreasing
    width: a short group fills the padding beside another instead of costing a row
    of its own (HH dialogues vary tenfold in length)."""
    width = max(widths)
    rows: list[list[int]] = []
    room: list[int] = []
    for g in sorted(range(len(widths)), key=lambda g: -widths[g]):
        for r, left in enumerate(room):
            if widths[g] <= left:
                rows[r].append(g)
                room[r] -= widths[g]
                break
        else:
            rows.append([g])
            room.append(width - widths[g])
    return rows


def pack_shared_prompts(sequences: Sequence[Sequence[int]], lengths: Sequence[int], pad_id: int) -> PackedRows:
    """Each group of neighbours with the same prompt (``prompt_groups``) as one
    block: its prompt, then its completions; blocks share rows where they fit
    (``fit_rows``) and never see each other. ``lengths`` are the completions'
    token counts (at least 1, at most the sequence)."""
    if any(not 1 <= n <= len(s) for s, n in zip(sequences, lengths)):
        raise ValueError("every completion length must be between 1 and its sequence's length")
    groups = prompt_groups(sequences, lengths)
    widths = [len(sequences[g[0]]) - lengths[g[0]] + sum(lengths[i] for i in g) for g in groups]
    rows_of_groups = fit_rows(widths)
    width = max(widths)
    shape = (len(rows_of_groups), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    # Which block each column belongs to (-1: padding), and its segment in the
    # block: 0 the prompt, k the k-th completion.
    block = torch.full(shape, -1, dtype=torch.long)
    segment = torch.full(shape, -1, dtype=torch.long)
    row, start, length = (torch.zeros(len(sequences), dtype=torch.long) for _ in range(3))
    for r, members in enumerate(rows_of_groups):
        col = 0
        for g in members:
            group = groups[g]
            first = sequences[group[0]]
            p = len(first) - lengths[group[0]]
            ids[r, col:col + p] = torch.tensor(list(first[:p]), dtype=torch.long)
            positions[r, col:col + p] = torch.arange(p)
            block[r, col:col + widths[g]] = g
            segment[r, col:col + p] = 0
            col += p
            for k, i in enumerate(group, start=1):
                n = lengths[i]
                ids[r, col:col + n] = torch.tensor(list(sequences[i][p:]), dtype=torch.long)
                positions[r, col:col + n] = torch.arange(p, p + n)
                segment[r, col:col + n] = k
                row[i], start[i], length[i] = r, col, n
                col += n
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    q, k = segment[:, :, None], segment[:, None, :]
    same_block = (block[:, :, None] == block[:, None, :]) & (block[:, :, None] >= 0)
    # A token sees the earlier tokens of its own segment and the whole prompt of
    # its block; a padding column sees only itself, so no row of the softmax is empty.
    allowed = causal & same_block & ((q == k) | ((k == 0) & (q > 0)))
    allowed |= torch.eye(width, dtype=torch.bool)
    return PackedRows(ids, positions, allowed, row, start, length)


def pool_packed(hidden: torch.Tensor, packed: PackedRows, how: str) -> torch.Tensor:
    """[R, T, H] -> [S, H]: each sequence's state at its last token (``eos``), or the
    mean over its completion's tokens (``mean``), as ``rlhf.reward_scoring.pool``
    reads a sequence alone."""
    row, start, length = (t.to(hidden.device) for t in (packed.row, packed.start, packed.length))
    if how == "eos":
        return hidden[row, start + length - 1]
    columns = torch.arange(hidden.shape[1], device=hidden.device)[None]
    mask = ((columns >= start[:, None]) & (columns < (start + length)[:, None])).to(hidden.dtype)
    return (hidden[row] * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
