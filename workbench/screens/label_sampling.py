"""The labeling screen's completions: asking the model host for them, and
taking its answers.

A prompt on screen without K completions of the current policy version is
sampled; while the researcher reads it, the prompt a label leads to is sampled
ahead, so labeling rarely waits. A sample the researcher has moved past is
dropped once the model is free (on a CPU a needless sample costs tens of
seconds), and one of a prompt edited meanwhile is sampled again.
"""

from __future__ import annotations

from textual.widgets import Static

from workbench.deck import Deck
from workbench.messages import CompletionsSampled, SamplingFailed, SamplingSkipped
from workbench.screens.base import WorkbenchScreen
from workbench.widgets.activity import Activity


class LabelSampling(WorkbenchScreen):
    """Part of LabelScreen (which shows what comes: ``show_current``,
    ``_show_completions``, ``_status``)."""

    deck: Deck | None

    def __init__(self) -> None:
        super().__init__()
        self._sampling: set[int] = set()       # prompt ids with samples under way
        self._edited: set[int] = set()         # prompts whose stored completions answer an older text
        # The current prompt and the one a label leads to: the only ones worth
        # sampling. Replaced, never mutated, so worker threads can read it.
        self._wanted: frozenset[int] = frozenset()

    def _need_samples(self, pid: int) -> None:
        note = self.query_one("#completions-note", Static)
        if self.wb.can_sample:
            self._request_samples(pid)
            self.query_one("#sample-activity", Activity).start(
                f"sampling {self.wb.k} completions of prompt {pid} from "
                + (f"best-of-{self.wb.best_of} of " if self.wb.best_of else "") + f"policy v{self.wb.policy_version}")
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


    def _want(self, *prompt_ids: int | None) -> None:
        """Only these prompts are worth sampling now."""
        self._wanted = frozenset(p for p in prompt_ids if p is not None)

    def _next_state(self, prompt_id: int | None) -> str:
        """What the status line says of the prompt a label leads to."""
        assert self.deck is not None
        if prompt_id is None:
            return ""
        if prompt_id in self._sampling:
            return "sampling…"
        return "ready" if self.deck.has_set(prompt_id) else ""
