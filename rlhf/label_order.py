"""Which comparison to label next: as added, at random, or where the reward model
is least sure (active learning).

A solo researcher's labels are the scarcest thing in the loop. For a set of K
answers, the reward model (the ensemble's mean, rlhf.reward_ensemble) gives a
distribution over which answer is best, softmax(r); its entropy is how unsure the
model is of the pick (uncertainty sampling, Lewis & Gale 1994; the ensemble-based
active learning of Dwaracherla et al. 2024, arXiv 2402.00396, and Muldrew et al.
2024, arXiv 2402.08114). The uncertain order takes every other label where that
entropy is highest and the others at random: a queue of the model's doubts alone
follows its blind spots and leaves the bulk of the data unlabeled (the sampling
bias of Dasgupta & Hsu 2008), and the labels the reward model trains on should
still look like the data it will score.

Measured with ``benchmarks/active.py`` (HH answer pairs, the "you/your" taste,
accuracy on 586 held-out pairs, 8 seeds): no order tried beats random order by
more than the seeds' spread, and none is twice as label-efficient. This one is
level with it (0.750 against 0.755 at 40 labels, 0.775 against 0.780 at 80). The
heads' disagreement (BALD, the mutual information between the pick and the head),
the first measure used, reached 0.750 and 0.769: it sought sets the taste calls a
tie (40% of its labels, against 29% at random), which train nothing. The heads'
spread of the margin, expected gradient length, density weighting, a diverse batch
and a random start before the doubts came out within the same ±0.02; so did
optimism (the set whose best answer scores highest, mean plus spread: 18% ties,
ahead at 20 labels, 0.726 against 0.689, level from 40 on). On these features the
held-out accuracy climbs slowly past 40 labels whichever labels they are.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, get_args

from rlhf.chat import chat_prompt_ids
from rlhf.errors import UserError

if TYPE_CHECKING:  # torch is imported where it is used: the app reads ORDERS without loading it
    import torch

    from rlhf.reward_scoring import RewardScorer
    from rlhf.rows import Completion

Order = Literal["added", "uncertain", "random"]
ORDERS: tuple[str, ...] = get_args(Order)


def pick_uncertainty(rewards: torch.Tensor) -> float:
    """[K, heads] raw rewards of one set -> the entropy (nats) of which answer the
    reward model, the heads' mean, picks as best: log K for answers it scores alike,
    towards 0 where one stands out."""
    import torch

    p = torch.softmax(rewards.float().mean(1), dim=0)
    return float(-(p * p.clamp_min(1e-12).log()).sum())


def set_uncertainties(scorer: RewardScorer, sets: Sequence[tuple[str, Sequence[Completion]]]) -> list[float]:
    """``pick_uncertainty`` of each (prompt text, completions) set under a reward
    version, all sets scored in one batched pass."""
    tok = scorer.stack.tokenizer
    prompt_ids = {prompt: chat_prompt_ids(tok, prompt) for prompt, _ in sets}
    rows = [prompt_ids[prompt] for prompt, shown in sets for _ in shown]
    ids = [c.token_ids or tok(c.text, add_special_tokens=False)["input_ids"] for _, shown in sets for c in shown]
    if not rows:
        return []
    heads = scorer.raw_heads_ids(rows, ids)
    out, start = [], 0
    for _, shown in sets:
        out.append(pick_uncertainty(heads[start:start + len(shown)]))
        start += len(shown)
    return out


def ordered(items: Sequence[object], order: str, *, uncertainty: Sequence[float] | None = None,
            seed: int = 0) -> list[int]:
    """Indices of ``items`` in the order asked: as given ('added'), shuffled by
    ``seed`` ('random'), or 'uncertain': the most uncertain and the next of the
    random order by turns (``interleave``)."""
    if order not in ORDERS:
        raise UserError(f"unknown order {order!r}: use one of {', '.join(ORDERS)}")
    index = list(range(len(items)))
    if order == "added":
        return index
    shuffled = index[:]
    random.Random(seed).shuffle(shuffled)
    if order == "random":
        return shuffled
    if uncertainty is None:
        raise UserError("ordering by uncertainty needs a reward model: train one first (`rlhf train-reward`)")
    return interleave(sorted(index, key=lambda i: -uncertainty[i]), shuffled)


def interleave(unsure_first: Sequence[int], shuffled: Sequence[int]) -> list[int]:
    """Every index once: the first not yet taken of ``unsure_first``, then of
    ``shuffled``, by turns (even positions by doubt, odd ones at random)."""
    out: list[int] = []
    taken: set[int] = set()
    sources = [iter(unsure_first), iter(shuffled)]
    while len(out) < len(unsure_first):
        for i in sources[0 if by_doubt_now(len(out)) else 1]:
            if i not in taken:
                taken.add(i)
                out.append(i)
                break
    return out


def by_doubt_now(labeled_in_order: int) -> bool:
    """Whether the next label of the uncertain order goes by doubt (else at random),
    after ``labeled_in_order`` labels in that order: the turns of ``interleave``."""
    return labeled_in_order % 2 == 0
