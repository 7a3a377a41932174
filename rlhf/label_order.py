"""Which comparison to label next: as added, at random, or where the reward model
is least sure (active learning).

A solo researcher's labels are the scarcest thing in the loop. The reward
ensemble (rlhf.reward_ensemble) says where it is unsure: for a set of K answers,
each head's Bradley–Terry rewards give a distribution over which answer is best,
softmax(r_h); the heads disagree where the labels so far do not settle it. The
uncertainty of a set is the mutual information between the pick and the head,
H(mean_h p_h) − mean_h H(p_h) (BALD, Houlsby et al. 2011): high where the heads
confidently disagree, low where they agree, and low for a set all heads find a
toss-up (answers alike, such as four without the thing the taste is about),
which a label would not settle either. Ordering by it is the ensemble-based
active learning of Dwaracherla et al. 2024 (arXiv 2402.00396) and Muldrew et al.
2024 (arXiv 2402.08114).
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
    """[K, heads] raw rewards of one set -> the mutual information (nats) between
    which answer is best and which head is asked (0 for a single head)."""
    import torch

    p = torch.softmax(rewards.float(), dim=0)                 # each head's distribution over the K
    mean = p.mean(1)

    def entropy(q: torch.Tensor) -> torch.Tensor:
        return -(q * q.clamp_min(1e-12).log()).sum(0)

    return float(entropy(mean) - entropy(p).mean())


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
    ``seed`` ('random'), or most uncertain first ('uncertain', ties as given)."""
    if order not in ORDERS:
        raise UserError(f"unknown order {order!r}: use one of {', '.join(ORDERS)}")
    index = list(range(len(items)))
    if order == "random":
        random.Random(seed).shuffle(index)
    elif order == "uncertain":
        if uncertainty is None:
            raise UserError("ordering by uncertainty needs a reward model: train one first (`rlhf train-reward`)")
        index.sort(key=lambda i: -uncertainty[i])
    return index
