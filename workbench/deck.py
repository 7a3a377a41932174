"""The labeling deck: which prompt is on screen, which comes next, and the
completions each prompt shows, in the order shown.

No widgets here (the label screen draws what the deck holds), so the rules can
be read, and tested, on their own:

- Prompts come in id order; the deck opens on the first one to label, and a
  label moves on to the next (wrapping round). To label: a prompt with no label
  yet, or one where a set of the current version waits (a PPO iteration's
  rollouts queued for labeling: label what the policy produces now). The order of
  what comes next is a setting (``order``): as added, random, or uncertain
  (the prompt whose waiting set's label would tell the reward model most, the
  highest ``priority``: rlhf.label_order).
- A prompt shows K completions of the current policy version (or, with
  ``best_of``, K of its best-of-N picks). The latest K in
  the store are reused (a reopened workbench does not resample what it already
  sampled); otherwise the screen asks for new ones.
- The display order is shuffled once per set, so that the position of a
  completion says nothing about when it was sampled: labelers favour the first
  (or last) option they read, and a fixed order would bias the labels.
"""

from __future__ import annotations

import random

from rlhf.label_order import ORDERS
from rlhf.rows import Completion, Prompt
from rlhf.store import Store


class Deck:
    def __init__(self, store: Store, k: int, rng: random.Random | None = None) -> None:
        self.store = store
        self.k = k
        self.rng = rng or random.Random()
        self.prompt_ids: list[int] = []
        self._unlabeled: set[int] = set()
        self._sets: dict[int, list[Completion]] = {}  # prompt id -> completions in display order
        self.current_id: int | None = None
        self.policy_version = 0          # the version sampled from: its waiting sets count as to label
        self.best_of: int | None = None  # N when the sets are best-of-N picks of the version
        self._waiting: set[int] = set()  # labeled prompts where a set of that version waits
        self.order = "added"
        self.priority: dict[int, float] = {}      # prompt id -> how soon the uncertain order labels its set
        self._random_key: dict[int, float] = {}   # the 'random' order, drawn once per prompt
        self.reload()
        to_label = [pid for pid in self.prompt_ids if self._to_label(pid)]
        self.current_id = to_label[0] if to_label else (self.prompt_ids[0] if self.prompt_ids else None)

    # -- prompts and progress

    def reload(self) -> None:
        """Read the prompt list and which prompts are labeled from the store."""
        self.prompt_ids = [p.id for p in self.store.prompts()]
        self._unlabeled = set(self.store.unlabeled_prompt_ids())
        self._waiting = {pid for pid, shown in self.store.pending_sets(self.k)
                         if self._of_source(shown) and len(shown) == self.k} - self._unlabeled
        if self.current_id not in self.prompt_ids:
            self.current_id = self.prompt_ids[0] if self.prompt_ids else None

    def prompt(self, prompt_id: int) -> Prompt:
        return self.store.prompt(prompt_id)

    def is_labeled(self, prompt_id: int) -> bool:
        return not self._to_label(prompt_id)

    def _of_source(self, shown: list[Completion]) -> bool:
        """Whether a set was sampled from what the deck shows (its version, best-of-N or not)."""
        return shown[0].policy_version == self.policy_version and shown[0].best_of == self.best_of

    def _to_label(self, prompt_id: int) -> bool:
        return prompt_id in self._unlabeled or prompt_id in self._waiting

    def mark_labeled(self, prompt_id: int, labeled: bool = True) -> None:
        if labeled:
            self._unlabeled.discard(prompt_id)
            self._waiting.discard(prompt_id)
        else:
            self._unlabeled.add(prompt_id)

    @property
    def labeled_count(self) -> int:
        return len(self.prompt_ids) - self.remaining_count

    @property
    def remaining_count(self) -> int:
        return len(self._unlabeled | self._waiting)

    @property
    def position(self) -> int:
        """0-based index of the current prompt in the list (-1 when there is none)."""
        return self.prompt_ids.index(self.current_id) if self.current_id in self.prompt_ids else -1

    # -- moving

    def go(self, prompt_id: int) -> None:
        if prompt_id not in self.prompt_ids:
            raise KeyError(prompt_id)
        self.current_id = prompt_id

    def step(self, delta: int) -> bool:
        """Move to the next (+1) or previous (-1) prompt; False at either end."""
        i = self.position + delta
        if not 0 <= i < len(self.prompt_ids):
            return False
        self.current_id = self.prompt_ids[i]
        return True

    def set_order(self, order: str) -> None:
        if order not in ORDERS:
            raise ValueError(f"unknown order {order!r}")
        self.order = order

    def next_unlabeled(self) -> int | None:
        """The next unlabeled prompt by the order; None when every other prompt is
        labeled. As added: the first after the current one, wrapping round."""
        n = len(self.prompt_ids)
        start = self.position
        waiting = [pid for offset in range(1, n + 1)
                   if self._to_label(pid := self.prompt_ids[(start + offset) % n]) and pid != self.current_id]
        if self.order == "uncertain":
            known = [pid for pid in waiting if pid in self.priority]
            # Not measured yet (no model loaded, or no set sampled): as added.
            return max(known, key=self.priority.__getitem__) if known else (waiting[0] if waiting else None)
        if self.order == "random" and waiting:
            for pid in waiting:
                self._random_key.setdefault(pid, self.rng.random())
            return min(waiting, key=self._random_key.__getitem__)
        return waiting[0] if waiting else None

    def priorities_spent(self) -> bool:
        """In the uncertain order, whether no prompt left to label has a priority
        (all labeled, past the design's picks, or sampled since it was measured):
        time to measure again."""
        return self.order == "uncertain" and not any(v > 0 and self._to_label(pid) for pid, v in self.priority.items())

    def waiting_sets(self) -> list[tuple[int, list[Completion]]]:
        """Sampled sets of the deck's version not labeled yet, on prompts to label:
        what the uncertain order ranks."""
        return [(pid, shown) for pid, shown in self.store.pending_sets(self.k)
                if self._to_label(pid) and self._of_source(shown)]

    # -- completion sets

    def display_set(self, prompt_id: int, policy_version: int) -> list[Completion] | None:
        """The K completions to show for a prompt, in display order; None when the
        store has fewer than K of this policy version (sample first)."""
        if prompt_id in self._sets:
            return self._sets[prompt_id]
        stored = self.store.completions_for_prompt(prompt_id, policy_version, self.best_of)
        if len(stored) < self.k:
            return None
        return self._shuffled(prompt_id, stored[-self.k:])

    def set_sampled(self, prompt_id: int, completion_ids: list[int], policy_version: int) -> list[Completion] | None:
        """New completions of a prompt, shuffled for display; None when they come
        from another policy version or best-of-N (sampled just before a switch)."""
        completions = self.store.completions(completion_ids)
        if any(c.policy_version != policy_version or c.best_of != self.best_of for c in completions):
            return None
        return self._shuffled(prompt_id, completions)

    def set_exact(self, prompt_id: int, completion_ids: list[int]) -> list[Completion]:
        """Completions in exactly this order (what a label recorded as shown)."""
        self._sets[prompt_id] = self.store.completions(completion_ids)
        return self._sets[prompt_id]

    def has_set(self, prompt_id: int) -> bool:
        return prompt_id in self._sets

    def forget(self, prompt_id: int | None = None) -> None:
        """Drop the set of one prompt (resample), or of every prompt (new policy version)."""
        if prompt_id is None:
            self._sets.clear()
        else:
            self._sets.pop(prompt_id, None)

    def _shuffled(self, prompt_id: int, completions: list[Completion]) -> list[Completion]:
        order = list(completions)
        self.rng.shuffle(order)
        self._sets[prompt_id] = order
        return order
