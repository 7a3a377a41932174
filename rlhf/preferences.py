"""Labels and the preference pairs they imply.

Each kind of answer is a small rule (after lm-human-preferences' label_types.py):
- ``best``: the pick beats each of the other K-1 completions (K-1 pairs). Where
  the top is shared, the choice names every completion that shares it: each of
  them beats each of the rest (W x (K-W) pairs), so a labeler who sees two
  equally good answers still says which are worse;
- ``ranking``: a full order, best first, gives all C(K,2) pairs;
- ``tie``, ``all_bad``, ``skip``: kept in the store as they are and give no pairs
  (a tie carries no Bradley-Terry signal without a tie-aware loss).
"""

from __future__ import annotations

from collections import Counter
from functools import partial
from itertools import combinations
from typing import TYPE_CHECKING

from rlhf.errors import UserError
from rlhf.label_order import label_priorities, labeled_sets, ordered, set_features
from rlhf.rows import LABEL_KINDS, Comparison, count_decided
from rlhf.rules import Rule, judge
from rlhf.store import Store

if TYPE_CHECKING:
    from rlhf.reward_scoring import RewardScorer

PAIRLESS_KINDS = ("tie", "all_bad", "skip")


def pairs_for_label(kind: str, completion_ids: list[int], choice: list[int] | None) -> list[tuple[int, int]]:
    """(chosen, rejected) completion ids for one label.

    ``choice`` holds positions in ``completion_ids`` (the order shown): the pick
    for ``best`` (or the picks that share the top, fewer than K), every position
    best first for ``ranking``."""
    if kind not in LABEL_KINDS:
        raise UserError(f"unknown label kind {kind!r}: use one of {', '.join(LABEL_KINDS)}")
    if kind in PAIRLESS_KINDS:
        return []
    k = len(completion_ids)
    if not choice or any(not 0 <= c < k for c in choice):
        raise UserError(f"a {kind} label needs positions between 0 and {k - 1}, got {choice}")
    if kind == "best":
        if len(set(choice)) != len(choice) or len(choice) >= k:
            raise UserError(f"a best-of-K label picks one completion, or several that share the top but not all "
                            f"{k}: got {choice} (all equal is a tie)")
        winners = [completion_ids[c] for c in choice]
        return [(best, other) for best in winners for other in completion_ids if other not in winners]
    if sorted(choice) != list(range(k)):
        raise UserError(f"a ranking must order all {k} completions exactly once, got {choice}")
    ranked = [completion_ids[c] for c in choice]
    return list(combinations(ranked, 2))  # earlier in the ranking = chosen


def record_label(store: Store, prompt_id: int, completion_ids: list[int], kind: str,
                 choice: list[int] | None = None, *, labeler: str | None = None,
                 seconds: float | None = None, purpose: str = "preference") -> int:
    """Record a label and its pairs in one transaction; returns the comparison id."""
    pairs = pairs_for_label(kind, completion_ids, choice)
    return store.record_comparison(prompt_id, completion_ids, kind, choice, pairs,
                                   labeler=labeler, seconds=seconds, purpose=purpose)


def undo_last_label(store: Store, *, labeler: str | None = None,
                    purpose: str = "preference") -> Comparison | None:
    """Remove the most recent label (and its pairs, nothing else). Returns it, or
    None when there is nothing to undo."""
    last = store.last_comparison(purpose=purpose, labeler=labeler)
    if last is not None:
        store.delete_comparison(last.id)
    return last


def label_by_rule(store: Store, rule: Rule, *, k: int = 4, rank: bool = False, limit: int | None = None,
                  decided: int | None = None, order: str = "added", scorer: RewardScorer | None = None,
                  seed: int = 0) -> Counter[str]:
    """Label pending comparisons (``Store.pending_sets``) as a labeler with the
    rule's taste would: the best of K (every one that shares the top, where
    not all K do), a tie where all score the same, or with ``rank`` a full
    ranking where all K differ. Recorded as ordinary comparisons by the labeler
    ``rule:NAME``. With ``limit``, which ones: the first in ``order``
    (rlhf.label_order: as added, at random, or 'uncertain', the sets whose labels
    tell the reward model most, their features read by ``scorer``, which
    ``label_order.design_scorer`` gives). With ``decided``,
    label in that order until this many have a preference (best or ranking): the
    ties met on the way are recorded too but not counted, since a tie trains
    nothing; the budget a labeler's informative labels set. Returns how many
    labels of each kind."""
    pending = store.pending_sets(k)
    priority = None
    if order == "uncertain" and scorer is not None:
        priority = label_priorities(partial(set_features, scorer),
                                    [(store.prompt(pid).text, shown) for pid, shown in pending], labeled_sets(store))
    kinds: Counter[str] = Counter()
    for i in ordered(pending, order, priority=priority, seed=seed)[:limit]:
        prompt_id, shown = pending[i]
        verdict = judge([rule(c.text, c.token_ids or (), c.finish_reason == "eos") for c in shown], rank=rank)
        record_label(store, prompt_id, [c.id for c in shown], verdict.kind, verdict.choice, labeler=rule.labeler)
        kinds[verdict.kind] += 1
        if decided is not None and count_decided(kinds) >= decided:
            break
    return kinds
