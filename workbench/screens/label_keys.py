"""The labeling screen's keys that record labels: pick, several that share the
top, rank, tie, all bad, skip, undo, and a rule that labels every waiting
comparison.

What a label records: the completions in the order shown, the kind of answer
and the choice (shown positions, best first), the labeler, and the seconds from
when the completions appeared to the key press. Pairs follow from
rlhf.preferences: a pick gives K-1, W picks that share the top W x (K-W), a full
ranking C(K,2), the rest none.
"""

from __future__ import annotations

import time
from typing import cast

from textual import work

from rlhf.consistency import PURPOSE as REPEAT
from rlhf.consistency import pick_repeat, repeat_due, self_agreement
from rlhf.errors import UserError
from rlhf.preferences import record_label, undo_last_label
from rlhf.rows import Comparison, Completion
from workbench.deck import Deck
from workbench.screens.base import WorkbenchScreen
from workbench.screens.dialogs import RuleDialog
from workbench.widgets.completion_card import CompletionCard
from workbench.widgets.status_line import StatusLine

LABEL_ACTIONS = ("pick", "label", "toggle_ranking", "share_top")


class LabelKeys(WorkbenchScreen):
    """Part of LabelScreen (which holds what is shown and moves on:
    ``show_current``, ``_status``, ``_fill_list``, ``_list_mark``,
    ``_measure_priorities_when_spent``)."""

    deck: Deck | None
    shown: list[Completion]
    shown_prompt_id: int | None
    _shown_at: float  # when the completions appeared: a label records the seconds since

    def __init__(self) -> None:
        super().__init__()
        self.ranking_mode = False
        self.sharing_mode = False              # marking the completions that share the top
        self.ranking: list[int] = []           # shown positions (0-based), best first (or marked, sharing)
        self.repeat_of: Comparison | None = None  # on screen again, unannounced (rlhf.consistency)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "pick" and parameters and int(cast(int, parameters[0])) > self.wb.k:
            return False  # keys above K do nothing and stay out of the palette
        if action in LABEL_ACTIONS and not self.shown:
            return None  # shown dimmed in the footer until there is something to label
        return True

    def action_pick(self, number: int) -> None:
        if not self._ready_to_label():
            return
        position = number - 1
        if self.ranking_mode:
            self._rank(position)
        elif self.sharing_mode:
            self._mark(position)
        else:
            self._record("best", [position])

    def on_completion_card_clicked(self, message: CompletionCard.Clicked) -> None:
        self.action_pick(message.number)

    def action_label(self, kind: str) -> None:
        if self._ready_to_label():
            self._record(kind, None)

    def action_toggle_ranking(self) -> None:
        self.ranking_mode, self.sharing_mode = not self.ranking_mode, False
        self._clear_ranking()  # the status line shows the mode

    def action_share_top(self) -> None:
        """Several answers equally best: '=' starts marking them, numbers mark, and
        '=' again records the marked ones as sharing the top (each beats the rest)."""
        if not self._ready_to_label():
            return
        marked = list(self.ranking)
        if self.sharing_mode and marked:
            self.sharing_mode = False
            self._record("best", marked)
            return
        self.sharing_mode, self.ranking_mode = not self.sharing_mode, False
        self._clear_ranking()

    def _mark(self, position: int) -> None:
        if position in self.ranking:
            self.ranking.remove(position)
            self.cards[position].set_rank(None)
        elif len(self.ranking) == self.wb.k - 1:
            self.notify(f"all {self.wb.k} equally good is a tie: press t", severity="warning", timeout=3)
            return
        else:
            self.ranking.append(position)
            self.cards[position].set_rank(1)
        self._status()

    def action_clear_ranking(self) -> None:
        self._clear_ranking()

    def _clear_ranking(self) -> None:
        self.ranking = []
        for card in self.cards:
            card.set_rank(None)
        if self.deck is not None:
            self._status()

    def _rank(self, position: int) -> None:
        if position in self.ranking:
            self.notify(f"{position + 1} is already ranked {self.ranking.index(position) + 1}; "
                        "escape starts the ranking over", severity="warning", timeout=3)
            return
        self.ranking.append(position)
        self.cards[position].set_rank(len(self.ranking))
        if len(self.ranking) == self.wb.k - 1:  # the last one is implied
            last = next(p for p in range(self.wb.k) if p not in self.ranking)
            self.ranking.append(last)
            self.cards[last].set_rank(self.wb.k)
            self._record("ranking", list(self.ranking))
        else:
            self._status()

    def _ready_to_label(self) -> bool:
        if not self.shown or self.shown_prompt_id is None:
            self.notify("nothing to label yet: completions are still coming", severity="warning", timeout=2)
            return False
        return True

    def _record(self, kind: str, choice: list[int] | None) -> None:
        assert self.deck is not None and self.shown_prompt_id is not None
        pid = self.shown_prompt_id
        seconds = round(time.monotonic() - self._shown_at, 2)
        repeat = self.repeat_of is not None and {c.id for c in self.shown} == set(self.repeat_of.completion_ids)
        try:
            record_label(self.wb.store, pid, [c.id for c in self.shown], kind, choice,
                         labeler=self.wb.labeler, seconds=seconds, purpose=REPEAT if repeat else "preference")
        except UserError as e:
            self.notify(str(e), severity="error")
            return
        if repeat:
            self.repeat_of = None
            self.deck.forget(pid)  # the next visit shows the prompt's own set again
            self._show_self_agreement()
        else:
            self.wb.model_host.measure_agreement(self)
            self.deck.mark_labeled(pid)
            self._list_mark(pid)
            self._measure_priorities_when_spent()
            if self._show_a_repeat():
                return
        nxt = self.deck.next_unlabeled()
        if nxt is None:
            self.notify("every prompt is labeled: add prompts (a), or resample one (r) to label it again",
                        timeout=5)
            self.deck.step(1)
        else:
            self.deck.go(nxt)
        self.show_current()

    def _show_a_repeat(self) -> bool:
        """Every so often (rlhf.consistency) an earlier comparison comes back,
        reshuffled; True when one is on screen."""
        assert self.deck is not None
        store, labeler = self.wb.store, self.wb.labeler
        if not repeat_due(store, labeler, self.wb.repeat_every):
            return False
        earlier = pick_repeat(store, labeler, self.wb.rng)
        if earlier is None or earlier.prompt_id not in self.deck.prompt_ids:
            return False
        order = list(earlier.completion_ids)
        self.wb.rng.shuffle(order)
        self.repeat_of = earlier
        self.deck.set_exact(earlier.prompt_id, order)
        self.deck.go(earlier.prompt_id)
        self.show_current()
        return True

    def _show_self_agreement(self) -> None:
        """The labeler against their earlier self, beside the reward model's agreement."""
        self.query_one(StatusLine).self_agreement = self_agreement(self.wb.store, self.wb.labeler).text()

    def action_label_by_rule(self) -> None:
        def chosen(spec: str | None) -> None:
            if spec is not None:
                self._label_by_rule(spec)

        self.app.push_screen(RuleDialog(), chosen)

    @work(thread=True, exclusive=True, group="rule-labels", exit_on_error=False)
    def _label_by_rule(self, spec: str) -> None:
        from rlhf.preferences import label_by_rule
        from rlhf.rules import parse_rule

        kinds = label_by_rule(self.wb.store, parse_rule(spec), k=self.wb.k)
        self.app.call_from_thread(self._rule_labeled, spec, dict(kinds))

    def _rule_labeled(self, spec: str, kinds: dict[str, int]) -> None:
        assert self.deck is not None
        if not kinds:
            self.notify("no comparisons are waiting for a label: sample first (r, or `rlhf sample`)",
                        severity="warning", timeout=5)
            return
        parts = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
        self.notify(f"labeled {sum(kinds.values())} comparisons as rule:{spec} ({parts})", timeout=5)
        self.wb.model_host.measure_agreement(self)
        self.deck.reload()
        self._fill_list()
        nxt = self.deck.next_unlabeled()
        if nxt is not None and self.deck.is_labeled(self.deck.current_id or nxt):
            self.deck.go(nxt)
        self.show_current()

    def action_undo(self) -> None:
        assert self.deck is not None
        last = undo_last_label(self.wb.store, labeler=self.wb.labeler)
        if last is None:
            self.notify("nothing to undo", severity="warning", timeout=2)
            return
        pid = last.prompt_id
        self.deck.reload()
        # Back to the undone prompt, showing exactly what was shown then.
        self.deck.set_exact(pid, last.completion_ids)
        self.deck.go(pid)
        self._list_mark(pid)
        self.notify(f"undid the {last.kind.replace('_', ' ')} label on prompt {pid}", timeout=3)
        self.show_current()

