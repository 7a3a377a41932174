"""How far a reward model agrees with preferences: accuracy and margin on
comparisons (held-out elements, or a preference file read without importing
it), and the labeled pairs it gets wrong, for the researcher to look at.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from rlhf.chat import chat_prompt_ids
from rlhf.reward_config import Readout
from rlhf.reward_data import Element
from rlhf.reward_loss import Comparisons, PairEval
from rlhf.reward_scoring import RewardScorer, score_sequences

if TYPE_CHECKING:
    from rlhf.model_stack import ModelStack
    from rlhf.store import Store


@torch.no_grad()
def evaluate_elements(stack: ModelStack, elements: Sequence[Element], readout: Readout, batch_size: int = 16,
                      best_of_k: str = "softmax") -> PairEval:
    """Pairwise accuracy (r_chosen > r_rejected), mean raw margin, and the mean
    training loss of the elements."""
    layout = Comparisons(elements, best_of_k)
    rewards = score_sequences(stack, layout.sequences, layout.lengths, readout, batch_size)
    return layout.evaluate(rewards)


def evaluate_texts(scorer: RewardScorer, pairs: Sequence[Any],
                   progress: Callable[[int, int], None] = lambda done, total: None) -> PairEval:
    """Accuracy and mean normalized margin on (prompt, chosen, rejected) text pairs,
    e.g. a public preference file read without importing it. Batches hold pairs
    of similar length (HH transcripts vary tenfold: one long pair would pad every
    other in its batch to its length); ``progress(done, total)`` after each."""
    tok = scorer.stack.tokenizer
    encoded = []
    for p in pairs:
        prompt = chat_prompt_ids(tok, p.prompt)
        chosen, rejected = (tok(t, add_special_tokens=False)["input_ids"] for t in (p.chosen, p.rejected))
        encoded.append((prompt, chosen, rejected))
    by_length = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]) + max(map(len, encoded[i][1:])))
    per_batch = max(1, scorer.batch_size // 2)
    margins = torch.zeros(len(encoded))
    for start in range(0, len(by_length), per_batch):
        rows = by_length[start:start + per_batch]
        raw = scorer.raw_ids([encoded[i][0] for i in rows for _ in range(2)],
                             [encoded[i][j] for i in rows for j in (1, 2)])
        margins[rows] = scorer.gain * (raw[0::2] - raw[1::2])
        progress(start + len(rows), len(encoded))
    if not encoded:
        return PairEval(float("nan"), float("nan"), 0)
    return PairEval(accuracy=(margins > 0).float().mean().item(), margin=margins.mean().item(),
                    n_pairs=len(margins))


@dataclass
class LabeledPairScore:
    """One labeled pair as the reward model sees it."""

    pair_id: int
    comparison_id: int | None
    prompt: str
    chosen: str
    rejected: str
    chosen_score: float
    rejected_score: float

    @property
    def margin(self) -> float:
        return self.chosen_score - self.rejected_score


def score_labeled_pairs(scorer: RewardScorer, store: Store, source: str = "label",
                        cache: dict[int, float] | None = None) -> list[LabeledPairScore]:
    """Every pair of ``source`` with both normalized scores; each completion is
    scored once (and not again when ``cache`` already holds it)."""
    cache = {} if cache is None else cache
    rows = store.pairs(source=source)
    ids = sorted({i for r in rows for i in (r["chosen_id"], r["rejected_id"])})
    completions = {c.id: c for c in store.completions(ids)}
    by_prompt: dict[str, dict[int, Any]] = {}
    for r in rows:
        for i in (r["chosen_id"], r["rejected_id"]):
            by_prompt.setdefault(r["prompt"], {})[i] = completions[i]
    for prompt, group in by_prompt.items():
        scorer.score_completions(prompt, list(group.values()), cache)
    return [LabeledPairScore(r["pair_id"], r["comparison_id"], r["prompt"], r["chosen"], r["rejected"],
                             cache[r["chosen_id"]], cache[r["rejected_id"]]) for r in rows]


def agreement(scored: Sequence[LabeledPairScore]) -> float | None:
    """How often the reward model ranks a labeled pair as the labeler did."""
    return sum(s.margin > 0 for s in scored) / len(scored) if scored else None


def disagreements(scored: Sequence[LabeledPairScore]) -> list[LabeledPairScore]:
    """Pairs the reward model gets wrong, worst (most confidently wrong) first."""
    return sorted((s for s in scored if s.margin <= 0), key=lambda s: s.margin)
