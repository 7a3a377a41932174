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


def winners_and_losers(element: Element) -> tuple[list[int], list[int]]:
    """A best-of-K pick's sequences that share the top (one, usually) and the rest."""
    return list(dict.fromkeys(c for c, _ in element.pairs)), list(dict.fromkeys(r for _, r in element.pairs))


def as_choice(element: Element, best_of_k: str) -> bool:
    """Whether the element trains as K-way choices (a best-of-K pick under 'softmax')."""
    return element.kind == "best" and best_of_k == "softmax" and len(element.pairs) > 1


def element_loss(rewards: torch.Tensor, element: Element, best_of_k: str) -> torch.Tensor:
    """The loss of one comparison given the rewards of its completions. A ranking's
    pairs are averaged, so a prompt weighs the same whatever its K (InstructGPT).
    A pick whose top is shared is one choice per winner, among it and the losers,
    averaged (each winner beat the rest; the winners are not compared)."""
    if as_choice(element, best_of_k):
        winners, losers = winners_and_losers(element)
        return torch.stack([best_of_k_loss(rewards[[w, *losers]], 0) for w in winners]).mean()
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
        self.sequence_element = torch.tensor([i for i, e in enumerate(self.elements) for _ in e.sequences],
                                             dtype=torch.long)
        pairs = [(i, offsets[i] + c, offsets[i] + r) for i, e in enumerate(self.elements) for c, r in e.pairs]
        self.pair_element, self.chosen, self.rejected = (torch.tensor(col, dtype=torch.long) for col in
                                                         (zip(*pairs) if pairs else ([], [], [])))
        # Best-of-K picks trained as K-way choices, one per winner (the winner at
        # column 0 of its sequences): (element, its sequences), by the choice's size.
        self.choices: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        groups: dict[int, list[tuple[int, list[int]]]] = {}
        for i, e in enumerate(self.elements):
            if as_choice(e, best_of_k):
                winners, losers = winners_and_losers(e)
                for w in winners:
                    seqs = [offsets[i] + s for s in (w, *losers)]
                    groups.setdefault(len(seqs), []).append((i, seqs))
        for k, rows in groups.items():
            self.choices[k] = (torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows]))
        chooses = torch.tensor([as_choice(e, best_of_k) for e in self.elements], dtype=torch.bool)
        self.as_pairs = ~chooses[self.pair_element] if pairs else torch.zeros(0, dtype=torch.bool)

    def margins(self, rewards: torch.Tensor) -> torch.Tensor:
        """r_chosen − r_rejected for every pair."""
        return rewards[self.chosen] - rewards[self.rejected]

    def loss(self, rewards: torch.Tensor) -> torch.Tensor:
        """The mean over elements of ``element_loss``: a best-of-K pick's softmax
        loss (the mean over its winners), the mean Bradley–Terry loss of any other
        element's pairs."""
        return self.element_losses(rewards).mean()

    def element_losses(self, rewards: torch.Tensor) -> torch.Tensor:
        """``element_loss`` of every element: [elements] from rewards [sequences],
        or [elements, heads] from [sequences, heads] (an ensemble, all at once)."""
        sums = rewards.new_zeros((len(self.elements), *rewards.shape[1:]))
        counts = torch.zeros_like(sums)
        for element_ids, seqs in self.choices.values():
            losses = -torch.log_softmax(rewards[seqs], dim=1)[:, 0]
            sums = sums.index_add(0, element_ids, losses)
            counts = counts.index_add(0, element_ids, torch.ones_like(losses))
        if self.as_pairs.any():
            ids = self.pair_element[self.as_pairs]
            pair_loss = -F.logsigmoid(self.margins(rewards)[self.as_pairs])
            sums = sums.index_add(0, ids, pair_loss)
            counts = counts.index_add(0, ids, torch.ones_like(pair_loss))
        return sums / counts.clamp(min=1)

    def evaluate(self, rewards: torch.Tensor) -> PairEval:
        if not self.elements:
            return PairEval(float("nan"), float("nan"), 0)
        m = self.margins(rewards)
        return PairEval(accuracy=(m > 0).float().mean().item(), margin=m.mean().item(), n_pairs=len(m),
                        loss=self.loss(rewards).item())
