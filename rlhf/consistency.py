"""The labeler's own consistency: an earlier comparison shown again, unannounced.

Human labelers agree with each other 60-75% of the time (InstructGPT, Ziegler et
al. 2019), and with themselves not always either; a reward model cannot be more
consistent than its labels. Now and then (``REPEAT_EVERY``) the labeling queue
shows again a comparison the labeler decided earlier, its completions reshuffled;
the answer is recorded with the purpose ``repeat`` (it trains nothing) and the
agreement of the labeler with their earlier self is shown beside the reward
model's agreement with the labels: the researcher's own ceiling.

Agreement is over the pairs the earlier label implied: the repeat orders a pair
the same way (1) or not (0; a tie or "all bad" decides no pair, so it disagrees
with a pick). A repeat that was skipped counts nothing.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from rlhf.preferences import pairs_for_label
from rlhf.rows import DECIDED_KINDS, Comparison
from rlhf.store import Store

PURPOSE = "repeat"
# One prompt in 20 shown again: enough repeats in a few hundred labels for a
# figure (15 in 300), few enough not to slow labeling.
REPEAT_EVERY = 20
# The latest labels are not shown again: the labeler would remember them.
NOT_THE_LAST = 5


def repeat_due(store: Store, labeler: str, every: int = REPEAT_EVERY) -> bool:
    """Whether the next comparison shown should be a repeat: ``every`` labels by
    this labeler since their last repeat (or since they began). 0 turns repeats off."""
    if every <= 0:
        return False
    mine = [c for c in store.comparisons() if c.labeler == labeler and c.purpose in ("preference", PURPOSE)]
    since = 0
    for cmp in reversed(mine):
        if cmp.purpose == PURPOSE:
            break
        since += 1
    return since >= every


def pick_repeat(store: Store, labeler: str, rng: random.Random) -> Comparison | None:
    """An earlier comparison of this labeler that decided something, among those
    shown again least often, not one of their last ``NOT_THE_LAST`` labels (at
    least not the very last); None when there is none."""
    labels = [c for c in store.comparisons(purpose="preference") if c.labeler == labeler]
    # All but the last NOT_THE_LAST; with fewer labels than that, the first alone (never the very last).
    older = labels[:len(labels) - NOT_THE_LAST] or labels[:1][:len(labels) - 1]
    mine = [c for c in older if c.kind in DECIDED_KINDS]
    if not mine:
        return None
    shown: dict[frozenset[int], int] = {}
    for cmp in store.comparisons(purpose=PURPOSE):
        key = frozenset(cmp.completion_ids)
        shown[key] = shown.get(key, 0) + 1
    fewest = min(shown.get(frozenset(c.completion_ids), 0) for c in mine)
    return rng.choice([c for c in mine if shown.get(frozenset(c.completion_ids), 0) == fewest])


@dataclass
class SelfAgreement:
    agreed: float        # pairs ordered as before
    pairs: int           # pairs the earlier labels decided
    repeats: int         # repeats counted

    @property
    def share(self) -> float | None:
        return self.agreed / self.pairs if self.pairs else None

    def text(self) -> str:
        return f"{self.share:.0%} of {self.repeats}" if self.share is not None else "—"


def self_agreement(store: Store, labeler: str) -> SelfAgreement:
    """How often this labeler's repeats order the earlier label's pairs the same way."""
    originals: dict[frozenset[int], Comparison] = {}
    for cmp in store.comparisons(purpose="preference"):
        if cmp.labeler == labeler:
            originals[frozenset(cmp.completion_ids)] = cmp  # the latest label of a set is the one repeated
    agreed, pairs, repeats = 0.0, 0, 0
    for repeat in store.comparisons(purpose=PURPOSE):
        original = originals.get(frozenset(repeat.completion_ids))
        if repeat.labeler != labeler or original is None or repeat.kind == "skip":
            continue
        before = pairs_for_label(original.kind, original.completion_ids, original.choice)
        now = set(pairs_for_label(repeat.kind, repeat.completion_ids, repeat.choice))
        agreed += sum(pair in now for pair in before)
        pairs += len(before)
        repeats += 1
    return SelfAgreement(agreed, pairs, repeats)
