"""The labeling screen: a prompt, K completions side by side, keys to judge them.

What a label records: the completions in the order shown, the kind of
answer and the choice (shown positions, best first), the labeler, and the
seconds from when the completions appeared to the key press. Pairs follow from
rlhf.preferences: a pick gives K-1, a full ranking C(K,2), the rest none.

Sampling and scoring are asked of the model host (workbench/model_host.py),
which answers this screen with messages; while the researcher reads one prompt
the next one is sampled, so labeling rarely waits.
"""

from __future__ import annotations

import sqlite3
import time
from typing import cast

from textual import events, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Container, Horizontal, Vertical
from textual.widgets import Static

from rlhf.errors import UserError
from rlhf.preferences import record_label, undo_last_label
from rlhf.rows import Completion
from workbench.deck import Deck
from workbench.messages import CompletionsSampled, SamplingFailed, SamplingSkipped, ScoresReady
from workbench.screens.base import WorkbenchScreen
from workbench.screens.dialogs import PromptEditor, RuleDialog
from workbench.widgets.activity import Activity
from workbench.widgets.completion_card import CompletionCard
from workbench.widgets.prompt_list import PromptList
from workbench.widgets.status_line import StatusLine

MAX_K = 6
LABEL_ACTIONS = ("pick", "label", "toggle_ranking")
# Below this many columns the completions stack vertically: four columns of
# fewer than 25 characters are harder to read than one scrolled column.
NARROW_COLUMNS = 100


class LabelScreen(WorkbenchScreen):
    BINDINGS = [
        Binding("1", "pick(1)", "Pick", tooltip="Pick completion 1 as best (or rank it next)"),
        *[Binding(str(n), f"pick({n})", "Pick", show=False, tooltip=f"Pick completion {n} as best (or rank it next)")
          for n in range(2, MAX_K + 1)],
        Binding("m", "toggle_ranking", "Rank mode", tooltip="Ranking mode on/off: numbers best to worst"),
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
        self.ranking_mode = False
        self.ranking: list[int] = []           # shown positions (0-based), best first
        self._sampling: set[int] = set()       # prompt ids with a sampling worker under way
        self._edited: set[int] = set()         # prompts whose stored completions answer an older text
        # The current prompt and the one a label leads to: the only ones worth
        # sampling. Replaced, never mutated, so worker threads can read it.
        self._wanted: frozenset[int] = frozenset()


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
        self._fill_list()
        self.watch(self.app, "model_state", self._model_state_changed, init=False)
        self.watch(self.app, "model_status", self._model_status_changed, init=False)
        self.watch(self.app, "policy_version", self._policy_changed, init=False)
        self.watch(self.app, "agreement", self.set_agreement)
        self._show_model_state(self.wb.model_state)
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

    def _policy_changed(self, version: int) -> None:
        assert self.deck is not None
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
        widget.border_title = f"Prompt {pid}  ·  {self.deck.position + 1} of {len(self.deck.prompt_ids)}"
        widget.border_subtitle = state

    def _show_completions(self, pid: int | None, completions: list[Completion]) -> None:
        self.shown = list(completions)
        self.shown_prompt_id = pid if completions else None
        padded: list[Completion | None] = [*completions, *[None] * (self.wb.k - len(completions))]
        for card, completion in zip(self.cards, padded, strict=True):
            card.show(completion)
            card.display = completion is not None
        self.query_one("#completions-note", Static).display = False
        self.refresh_bindings()
        if completions:
            self.query_one("#sample-activity", Activity).stop()
            self._shown_at = time.monotonic()
            assert pid is not None
            self.wb.model_host.score(self, pid, self.shown)

    def _need_samples(self, pid: int) -> None:
        note = self.query_one("#completions-note", Static)
        if self.wb.can_sample:
            self._request_samples(pid)
            self.query_one("#sample-activity", Activity).start(
                f"sampling {self.wb.k} completions of prompt {pid} from policy v{self.wb.policy_version}")
        elif self.wb.model_state == "failed":
            note.update("No completions: the model did not load (see above).")
            note.display = True
        else:
            note.update("Completions appear here once the model has loaded.")
            note.display = True

    def _request_samples(self, pid: int) -> None:
        if pid in self._sampling:
            return
        assert self.deck is not None
        self._sampling.add(pid)
        self.wb.model_host.sample(self, pid, self.deck.prompt(pid).text, still_wanted=lambda: pid in self._wanted)
        self._status()

    def on_completions_sampled(self, message: CompletionsSampled) -> None:
        assert self.deck is not None
        pid = message.prompt_id
        self._sampling.discard(pid)
        if message.text != self.deck.prompt(pid).text:  # edited meanwhile: sample the new text
            self._request_samples(pid)
            return
        self._edited.discard(pid)
        completions = self.deck.set_sampled(pid, message.ids, self.wb.policy_version)
        if pid == self.deck.current_id:
            if completions is None:  # the version changed while these were sampled
                self._need_samples(pid)
            else:
                self._show_completions(pid, completions)
                self._prefetch()
        self._status()

    def on_sampling_skipped(self, message: SamplingSkipped) -> None:
        assert self.deck is not None
        self._sampling.discard(message.prompt_id)
        if message.prompt_id == self.deck.current_id:  # came back to it meanwhile
            self.show_current()
        else:
            self._prefetch()
            self._status()

    def on_sampling_failed(self, message: SamplingFailed) -> None:
        assert self.deck is not None
        self._sampling.discard(message.prompt_id)
        if message.prompt_id == self.deck.current_id:
            self.query_one("#sample-activity", Activity).fail(f"sampling failed: {message.text}  (r to retry)")
        else:
            self.notify(f"sampling prompt {message.prompt_id} failed: {message.text}", severity="error")
        self._status()

    def _prefetch(self) -> None:
        """Sample the prompt a label leads to while this one is read."""
        assert self.deck is not None
        nxt = self.deck.next_unlabeled()
        if (nxt is not None and self.wb.can_sample and nxt not in self._sampling
                and (nxt in self._edited or self.deck.display_set(nxt, self.wb.policy_version) is None)):
            self._request_samples(nxt)

    def _status(self) -> None:
        deck = self.deck
        assert deck is not None
        status = self.query_one(StatusLine)
        status.labeled = deck.labeled_count
        status.total = len(deck.prompt_ids)
        status.pairs = self.wb.store.stats()["pairs_labeled"]
        status.policy_version = self.wb.policy_version
        if self.ranking_mode:
            order = " > ".join(str(p + 1) for p in self.ranking) or "press numbers best first"
            status.mode = f"ranking: {order}"
        else:
            status.mode = "pick best"
        nxt = deck.next_unlabeled()
        self._wanted = frozenset(p for p in (deck.current_id, nxt) if p is not None)
        if nxt is None:
            status.next_state = ""
        elif nxt in self._sampling:
            status.next_state = "sampling…"
        elif deck.has_set(nxt):
            status.next_state = "ready"
        else:
            status.next_state = ""

    def _fill_list(self) -> None:
        assert self.deck is not None
        prompts = self.wb.store.prompts()
        self.query_one(PromptList).fill([(p.id, p.text, self.deck.is_labeled(p.id)) for p in prompts],
                                        self.deck.current_id)

    # -- what the reward model says about the shown completions (rlhf.reward, via the model host)

    def on_scores_ready(self, message: ScoresReady) -> None:
        if [c.id for c in self.shown] == message.ids:  # still on screen
            self.show_scores(message.scores)

    def show_scores(self, scores: list[float] | None) -> None:
        """Reward-model scores of the shown completions, in display order (None clears)."""
        for i, card in enumerate(self.cards):
            card.set_score(scores[i] if scores is not None and i < len(scores) else None)

    def set_agreement(self, text: str | None) -> None:
        """How often the reward model agrees with the labeler, e.g. '71% of 120'."""
        self.query_one(StatusLine).agreement = text

    # -- labeling

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
        else:
            self._record("best", [position])

    def on_completion_card_clicked(self, message: CompletionCard.Clicked) -> None:
        self.action_pick(message.number)

    def action_label(self, kind: str) -> None:
        if self._ready_to_label():
            self._record(kind, None)

    def action_toggle_ranking(self) -> None:
        self.ranking_mode = not self.ranking_mode
        self._clear_ranking()  # the status line shows the mode

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
        try:
            record_label(self.wb.store, pid, [c.id for c in self.shown], kind, choice,
                         labeler=self.wb.labeler, seconds=seconds)
        except UserError as e:
            self.notify(str(e), severity="error")
            return
        self.wb.model_host.measure_agreement(self)
        self.deck.mark_labeled(pid)
        self._list_mark(pid)
        nxt = self.deck.next_unlabeled()
        if nxt is None:
            self.notify("every prompt is labeled: add prompts (a), or resample one (r) to label it again",
                        timeout=5)
            self.deck.step(1)
        else:
            self.deck.go(nxt)
        self.show_current()

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

    def _list_mark(self, pid: int) -> None:
        assert self.deck is not None
        self.query_one(PromptList).update_prompt(pid, self.deck.prompt(pid).text, self.deck.is_labeled(pid))

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
        self.toggle_class("-list-toggled")

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
