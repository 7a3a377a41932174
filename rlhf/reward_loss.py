"""The reward model's objective over labeled comparisons, and what it scores on held-out ones.

Training maximizes the Bradley–Terry log-likelihood of the labels,
P(a1 ≻ a2 | s) = σ(r(s,a1) − r(s,a2)), i.e. minimizes −log σ(r_chosen − r_rejected).
A best-of-K pick uses the softmax over its K rewards by default (Ziegler et al.
2019, lm-human-preferences ``label_types.py``); a full ranking trains all its C(K,2)
pairs as one batch element (InstructGPT). The functions below state the loss of
one element each; ``Comparisons`` computes the same over many elements at once,
which is what training uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlhf.reward_data import Element
from rlhf.stats import rate_text


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean −log σ(r_chosen − r_rejected) over pairs (TRL's RewardTrainer computes the same)."""
    return -F.logsigmoid(chosen - rejected).mean()


def best_of_k_loss(rewards: torch.Tensor, best: int) -> torch.Tensor:
    """−log softmax(r)[best]: the pick as one choice among K (Ziegler et al. 2019)."""
    return -torch.log_softmax(rewards, dim=-1)[best]


def element_loss(rewards: torch.Tensor, element: Element, best_of_k: str) -> torch.Tensor:
    """The loss of one comparison given the rewards of its completions. A ranking's
    pairs are averaged, so a prompt weighs the same whatever its K (InstructGPT)."""
    if element.kind == "best" and best_of_k == "softmax" and len(element.pairs) > 1:
        return best_of_k_loss(rewards, element.pairs[0][0])
    chosen = rewards[[c for c, _ in element.pairs]]
    rejected = rewards[[r for _, r in element.pairs]]
    return bradley_terry_loss(chosen, rejected)


def pair_margins(rewards: torch.Tensor, element: Element) -> torch.Tensor:
    """r_chosen − r_rejected for every pair of one element."""
    return torch.stack([rewards[c] - rewards[r] for c, r in element.pairs])


@dataclass
class PairEval:
    accuracy: float
    margin: float
    n_pairs: int
    loss: float = float("nan")   # the training loss on these elements (held-out loss)

    def text(self) -> str:
        """'0.58 on 12 pairs (95% CI 0.32-0.81)': accuracy with its count and interval."""
        return rate_text(self.accuracy, self.n_pairs)


class Comparisons:
    """Elements laid out over one vector of rewards, a reward per sequence, so that
    the losses and margins of all of them are a few tensor operations (the head
    trains for thousands of epochs over them)."""

    def __init__(self, elements: Sequence[Element], best_of_k: str = "softmax") -> None:
        self.elements = list(elements)
        self.sequences = [s for e in self.elements for s in e.sequences]
        if any(len(e.lengths) != len(e.sequences) for e in self.elements):
            raise ValueError("every Element needs its completion lengths, one per sequence (for the read-out)")
        self.lengths = [n for e in self.elements for n in e.lengths]
        offsets = [0]
        for e in self.elements:
            offsets.append(offsets[-1] + len(e.sequences))
        pairs = [(i, offsets[i] + c, offsets[i] + r) for i, e in enumerate(self.elements) for c, r in e.pairs]
        self.pair_element, self.chosen, self.rejected = (torch.tensor(col, dtype=torch.long) for col in
                                                         (zip(*pairs) if pairs else ([], [], [])))
        # A best-of-K pick trained as one K-way choice: (element, its sequences, the pick), by K.
        self.choices: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        groups: dict[int, list[tuple[int, list[int], int]]] = {}
        for i, e in enumerate(self.elements):
            if e.kind == "best" and best_of_k == "softmax" and len(e.pairs) > 1:
                seqs = list(range(offsets[i], offsets[i + 1]))
                groups.setdefault(len(seqs), []).append((i, seqs, e.pairs[0][0]))
        for k, rows in groups.items():
            self.choices[k] = (torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows]),
                               torch.tensor([r[2] for r in rows]))
        as_choice = torch.zeros(len(self.elements), dtype=torch.bool)
        for element_ids, _, _ in self.choices.values():
            as_choice[element_ids] = True
        self.as_pairs = ~as_choice[self.pair_element] if pairs else torch.zeros(0, dtype=torch.bool)

    def margins(self, rewards: torch.Tensor) -> torch.Tensor:
        """r_chosen − r_rejected for every pair."""
        return rewards[self.chosen] - rewards[self.rejected]

    def loss(self, rewards: torch.Tensor) -> torch.Tensor:
        """The mean over elements of ``element_loss``: a best-of-K pick's softmax
        loss, the mean Bradley–Terry loss of any other element's pairs."""
        per_element = torch.zeros(len(self.elements), dtype=rewards.dtype)
        for element_ids, seqs, best in self.choices.values():
            picked = torch.log_softmax(rewards[seqs], dim=-1).gather(1, best[:, None]).squeeze(1)
            per_element = per_element.index_put((element_ids,), -picked)
        if self.as_pairs.any():
            ids = self.pair_element[self.as_pairs]
            pair_loss = -F.logsigmoid(self.margins(rewards)[self.as_pairs])
            sums = torch.zeros_like(per_element).index_add(0, ids, pair_loss)
            counts = torch.zeros_like(per_element).index_add(0, ids, torch.ones_like(pair_loss))
            per_element = torch.where(counts > 0, sums / counts.clamp(min=1), per_element)
        return per_element.mean()

    def evaluate(self, rewards: torch.Tensor) -> PairEval:
        if not self.elements:
            return PairEval(float("nan"), float("nan"), 0)
        m = self.margins(rewards)
        return PairEval(accuracy=(m > 0).float().mean().item(), margin=m.mean().item(), n_pairs=len(m),
                        loss=self.loss(rewards).item())
