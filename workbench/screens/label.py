"""The labeling screen: a prompt, K completions side by side, keys to judge them.

This module holds the screen itself: its keys, its layout, what it shows (the
model's state, the prompt, its completions with their reward-model scores, the
status line) and the keys that move between and change prompts. The keys that
record labels are in ``label_keys.py``, asking for completions in
``label_sampling.py``. Sampling and scoring are asked of the model host
(workbench/model_host.py), which answers this screen with messages.
"""

from __future__ import annotations

import sqlite3
import time

from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Container, Horizontal, Vertical
from textual.widgets import Static

from rlhf.label_order import ORDERS
from rlhf.rows import Completion
from workbench.deck import Deck
from workbench.messages import PrioritiesMeasured, ScoresReady
from workbench.model_host import PRIORITIES_GROUP
from workbench.screens.dialogs import PromptEditor
from workbench.screens.label_keys import LabelKeys
from workbench.screens.label_sampling import LabelSampling
from workbench.widgets.activity import Activity
from workbench.widgets.completion_card import CompletionCard
from workbench.widgets.prompt_list import PromptList
from workbench.widgets.status_line import StatusLine

MAX_K = 6
# Below this many columns the completions stack vertically: four columns of
# fewer than 25 characters are harder to read than one scrolled column.
NARROW_COLUMNS = 100
ORDER_NAMES = {"added": "as added", "random": "random", "uncertain": "uncertain"}


class LabelScreen(LabelKeys, LabelSampling):
    BINDINGS = [
        Binding("1", "pick(1)", "Pick", tooltip="Pick completion 1 as best (or rank it next)"),
        *[Binding(str(n), f"pick({n})", "Pick", show=False, tooltip=f"Pick completion {n} as best (or rank it next)")
          for n in range(2, MAX_K + 1)],
        Binding("m", "toggle_ranking", "Rank mode", tooltip="Ranking mode on/off: numbers best to worst"),
        Binding("equals_sign", "share_top", "Shared best", show=False,
                tooltip="Several equally best: '=', their numbers, '=' again (each beats the rest)"),
        Binding("t", "label('tie')", "Tie", tooltip="Tie: keep as a tie (no pairs)"),
        Binding("b", "label('all_bad')", "All bad", tooltip="All bad (no pairs)"),
        Binding("s", "label('skip')", "Skip", tooltip="Skip this prompt (no pairs)"),
        Binding("u", "undo", "Undo", tooltip="Undo the last label"),
        Binding("r", "resample", "Resample", tooltip="Resample this prompt"),
        Binding("n", "step(1)", "Next", tooltip="Next prompt"),
        Binding("p", "step(-1)", "Prev", tooltip="Previous prompt"),
        Binding("a", "add_prompt", "Add", tooltip="Add a prompt"),
        Binding("e", "edit_prompt", "Edit", tooltip="Edit this prompt"),
        Binding("l", "toggle_list", "List", tooltip="Show or hide the prompt list"),
        Binding("o", "cycle_order", "Order", show=False,
                tooltip="What comes next: as added, uncertain (the label that tells the reward model most), or random"),
        Binding("g", "label_by_rule", "Rule", show=False,
                tooltip="Label every waiting comparison by a rule (a scripted labeler with a known taste)"),
        Binding("escape", "clear_ranking", "Clear ranking", show=False, tooltip="Clear a half-entered ranking"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.deck: Deck | None = None
        self.shown: list[Completion] = []      # on screen, in display order
        self.shown_prompt_id: int | None = None
        self._shown_at = 0.0                   # monotonic time the completions appeared

    # -- layout

    def compose_body(self) -> ComposeResult:
        yield StatusLine(id="status")
        yield Activity(id="model-activity")
        with Horizontal(id="label-body"):
            yield PromptList(id="prompt-list")
            with Vertical(id="label-main"):
                yield Static("", id="prompt", markup=False)
                yield Activity(id="sample-activity")
                yield Static("", id="completions-note")
                with Container(id="completions"):
                    for n in range(1, self.wb.k + 1):
                        yield CompletionCard(n, id=f"card-{n}")

    def on_mount(self) -> None:
        self.deck = Deck(self.wb.store, self.wb.k, rng=self.wb.rng)
        self._follow_source()
        self._fill_list()
        self.watch(self.app, "model_state", self._model_state_changed, init=False)
        self.watch(self.app, "model_status", self._model_status_changed, init=False)
        self.watch(self.app, "policy_version", self._policy_changed, init=False)
        self.watch(self.app, "best_of", self._policy_changed, init=False)
        self.watch(self.app, "agreement", self.set_agreement)
        self.watch(self.app, "prompts_added", self._prompts_added, init=False)
        self._show_model_state(self.wb.model_state)
        self._show_self_agreement()
        self.show_current()

    def on_resize(self, event: events.Resize) -> None:
        self.set_class(event.size.width < NARROW_COLUMNS, "narrow")

    @property
    def cards(self) -> list[CompletionCard]:
        return list(self.query(CompletionCard))

    # -- what the app tells us

    def _model_state_changed(self, state: str) -> None:
        self._show_model_state(state)
        if state == "ready":
            if self.deck is not None and self.deck.order == "uncertain":  # chosen while the model loaded
                self.wb.model_host.measure_priorities(self, self.deck.waiting_sets())
            if self.shown:  # stored completions went up before the model was there
                self.wb.model_host.score(self, self.shown_prompt_id, self.shown)
                self._prefetch()
                self._status()
            else:
                self.show_current()

    def _show_model_state(self, state: str) -> None:
        activity = self.query_one("#model-activity", Activity)
        if state == "loading":
            activity.start(f"loading the model: {self.wb.model_status}")
        elif state == "failed":
            activity.fail(f"{self.wb.model_status}  (fix --model and restart; ctrl+q quits)")
            if not self.shown:
                note = self.query_one("#completions-note", Static)
                note.update("No completions: the model did not load. Prompts can still be added and edited.")
                note.display = True
        else:
            activity.stop()

    def _model_status_changed(self, text: str) -> None:
        if self.wb.model_state == "loading":
            self.query_one("#model-activity", Activity).update_text(f"loading the model: {text}")

    def _follow_source(self) -> None:
        """The deck shows (and counts as waiting) sets of what the app samples from."""
        assert self.deck is not None
        self.deck.policy_version, self.deck.best_of = self.wb.policy_version, self.wb.best_of
        self.deck.reload()

    def _policy_changed(self, _value: int | None) -> None:
        assert self.deck is not None
        self._follow_source()
        self._fill_list()  # a queued set can make a labeled prompt one to label again
        self.deck.forget()  # sets of the old version must not be labeled as the new one
        self._status()
        self.show_current()

    # -- showing a prompt

    def show_current(self) -> None:
        """Put the deck's current prompt on screen, with its completions when
        they exist, else ask for them."""
        deck = self.deck
        assert deck is not None
        self._clear_ranking()
        pid = deck.current_id
        if self.repeat_of is not None and pid != self.repeat_of.prompt_id:
            deck.forget(self.repeat_of.prompt_id)  # moved on without answering the repeat: drop it
            self.repeat_of = None
        if pid is None:
            self.query_one("#prompt", Static).update("No prompts yet: press a to add one.")
            self._show_completions(None, [])
            self._status()
            return
        prompt = deck.prompt(pid)
        self._show_prompt(pid, prompt.text)
        self.query_one(PromptList).mark_current(pid)
        fresh_needed = pid in self._sampling or pid in self._edited
        completions = None if fresh_needed else deck.display_set(pid, self.wb.policy_version)
        if completions is not None:
            self._show_completions(pid, completions)
            self._prefetch()
        else:
            self._show_completions(None, [])
            self._need_samples(pid)
        self._status()

    def _show_prompt(self, pid: int, text: str) -> None:
        assert self.deck is not None
        widget = self.query_one("#prompt", Static)
        widget.update(text)
        state = "labeled (a new label adds to it)" if self.deck.is_labeled(pid) else "not labeled yet"
        if self.repeat_of is not None:
            state = ""  # a comparison shown again is not announced (rlhf.consistency)
        widget.border_title = f"Prompt {pid}  ·  {self.deck.position + 1} of {len(self.deck.prompt_ids)}"
        widget.border_subtitle = state

    def _show_completions(self, pid: int | None, completions: list[Completion]) -> None:
        had = bool(self.shown)
        self.shown = list(completions)
        self.shown_prompt_id = pid if completions else None
        padded: list[Completion | None] = [*completions, *[None] * (self.wb.k - len(completions))]
        for card, completion in zip(self.cards, padded, strict=True):
            card.show(completion)
            card.display = completion is not None
        self.query_one("#completions-note", Static).display = False
        if had != bool(self.shown):
            # The label keys light up or dim (check_action); the footer is rebuilt
            # for it, which is slow: only when that changed.
            self.refresh_bindings()
        if completions:
            self.query_one("#sample-activity", Activity).stop()
            self._shown_at = time.monotonic()
            assert pid is not None
            self.wb.model_host.score(self, pid, self.shown)

    def _status(self) -> None:
        deck = self.deck
        assert deck is not None
        status = self.query_one(StatusLine)
        status.labeled = deck.labeled_count
        status.total = len(deck.prompt_ids)
        status.pairs = self.wb.store.labeled_pair_count()
        status.policy_version = self.wb.policy_version
        status.best_of = self.wb.best_of
        if self.ranking_mode:
            order = " > ".join(str(p + 1) for p in self.ranking) or "press numbers best first"
            status.mode = f"ranking: {order}"
        elif self.sharing_mode:
            marked = ", ".join(str(p + 1) for p in self.ranking)
            status.mode = f"shared best: {marked} (= records)" if marked else "shared best: press their numbers, then ="
        else:
            status.mode = "pick best"
        # The order is shown where it is not the default.
        status.order = "" if deck.order == "added" else ORDER_NAMES[deck.order]
        nxt = deck.next_unlabeled()
        self._want(deck.current_id, nxt)
        status.next_state = self._next_state(nxt)

    def _fill_list(self) -> None:
        assert self.deck is not None
        prompts = self.wb.store.prompts()
        self.query_one(PromptList).fill([(p.id, p.text, self.deck.is_labeled(p.id)) for p in prompts],
                                        self.deck.current_id)

    def _prompts_added(self) -> None:
        """Prompts joined the queue from elsewhere (an import): list them, leaving
        the prompt on screen (and a ranking under way) as it is."""
        assert self.deck is not None
        shown = self.deck.current_id
        self.deck.reload()
        self._fill_list()
        self._status()
        if shown is None:
            self.show_current()

    def _list_mark(self, pid: int) -> None:
        assert self.deck is not None
        self.query_one(PromptList).update_prompt(pid, self.deck.prompt(pid).text, self.deck.is_labeled(pid))

    # -- what the reward model says about the shown completions (rlhf.reward, via the model host)

    def on_scores_ready(self, message: ScoresReady) -> None:
        if [c.id for c in self.shown] == message.ids:  # still on screen
            self.show_scores(message.scores)

    def show_scores(self, scores: list[float] | None) -> None:
        """Reward-model scores of the shown completions, in display order (None clears)."""
        for i, card in enumerate(self.cards):
            card.set_score(scores[i] if scores is not None and i < len(scores) else None)

    # -- which prompt comes next (rlhf.label_order)

    def action_cycle_order(self) -> None:
        assert self.deck is not None
        order = ORDERS[(ORDERS.index(self.deck.order) + 1) % len(ORDERS)]
        self.deck.set_order(order)
        if order == "uncertain":
            self.wb.model_host.measure_priorities(self, self.deck.waiting_sets())
        self.notify(f"next: {ORDER_NAMES[order]}", timeout=2)
        self._status()

    def on_screen_resume(self) -> None:
        # Back from another screen: new labels, sets or a reward version change the order.
        if self.deck is not None and self.deck.order == "uncertain":
            self.wb.model_host.measure_priorities(self, self.deck.waiting_sets())

    def _measure_priorities_when_spent(self) -> None:
        """Measure the uncertain order again once its ranked sets are labeled (or
        it ranked none of those left), unless a measurement is under way."""
        assert self.deck is not None
        busy = any(w.group == PRIORITIES_GROUP and w.is_running for w in self.workers)
        if self.deck.priorities_spent() and not busy:
            self.wb.model_host.measure_priorities(self, self.deck.waiting_sets())

    def on_priorities_measured(self, message: PrioritiesMeasured) -> None:
        assert self.deck is not None
        self.deck.priority = message.priority
        self._status()

    def set_agreement(self, text: str | None) -> None:
        """How often the reward model agrees with the labeler, e.g. '71% of 120'."""
        self.query_one(StatusLine).agreement = text

    # -- moving and changing prompts

    def action_step(self, delta: int) -> None:
        assert self.deck is not None
        if self.deck.step(delta):
            self.show_current()
        else:
            self.notify("no more prompts this way", timeout=2)

    def on_prompt_list_chosen(self, message: PromptList.Chosen) -> None:
        assert self.deck is not None
        if message.prompt_id != self.deck.current_id:
            self.deck.go(message.prompt_id)
            self.show_current()

    def action_toggle_list(self) -> None:
        # On the list, not the screen: a class on the screen restyles every widget
        # on it (about a fifth of a second on two busy cores).
        self.query_one(PromptList).toggle_class("-toggled")

    def action_resample(self) -> None:
        assert self.deck is not None
        pid = self.deck.current_id
        if pid is None:
            return
        if not self.wb.can_sample:
            self.notify("the model is not loaded yet", severity="warning", timeout=2)
            return
        self.deck.forget(pid)
        self._clear_ranking()
        self._show_completions(None, [])
        self._need_samples(pid)

    def action_add_prompt(self) -> None:
        def added(text: str | None) -> None:
            if text is None:
                return
            assert self.deck is not None
            before = set(self.deck.prompt_ids)
            pid = self.wb.store.add_prompt(text, source="workbench")
            self.deck.reload()
            self._fill_list()
            self.deck.go(pid)
            self.notify("prompt added" if pid not in before else f"that prompt is already there (prompt {pid})",
                        timeout=3)
            self.show_current()

        self.app.push_screen(PromptEditor("Add a prompt (ctrl+s saves)"), added)

    def action_edit_prompt(self) -> None:
        assert self.deck is not None
        pid = self.deck.current_id
        if pid is None:
            return
        old = self.deck.prompt(pid).text

        def edited(text: str | None) -> None:
            if text is None or text == old:
                return
            try:
                self.wb.store.edit_prompt(pid, text)
            except sqlite3.IntegrityError:
                self.notify("another prompt has exactly this text: edit not saved", severity="error")
                return
            assert self.deck is not None
            self._list_mark(pid)
            # The completions so far answer the old text: never show them again.
            self._edited.add(pid)
            self.deck.forget(pid)
            if self.deck.current_id == pid:
                self.show_current()

        self.app.push_screen(PromptEditor(f"Edit prompt {pid} (ctrl+s saves)", old), edited)
