"""Messages that carry results from worker threads back to the event loop.

Workers never touch widgets: they post one of these (``post_message`` is
thread-safe) and the handler on the event loop updates the screen.
"""

from __future__ import annotations

from typing import Any

from textual.message import Message


class ModelStatus(Message):
    """A line of progress while the model loads (or converts, the first time)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class ModelLoaded(Message):
    """The model stack is ready to sample."""

    def __init__(self, stack: Any, seconds: float) -> None:
        super().__init__()
        self.stack = stack
        self.seconds = seconds


class ModelFailed(Message):
    """Loading failed; ``text`` is one line the user can act on."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class CompletionsSampled(Message):
    """K new completions of a prompt are in the store (``ids`` in sampling order);
    ``text`` is the prompt text they answer (it may have been edited since)."""

    def __init__(self, prompt_id: int, text: str, ids: list[int], seconds: float) -> None:
        super().__init__()
        self.prompt_id = prompt_id
        self.text = text
        self.ids = ids
        self.seconds = seconds


class SamplingSkipped(Message):
    """A queued sample was dropped: its prompt was no longer wanted when the model was free."""

    def __init__(self, prompt_id: int) -> None:
        super().__init__()
        self.prompt_id = prompt_id


class SamplingFailed(Message):
    def __init__(self, prompt_id: int, text: str) -> None:
        super().__init__()
        self.prompt_id = prompt_id
        self.text = text


class CompletionsShown(Message):
    """A set of completions went on screen (bubbles to the app). A reward model
    can listen for this to score them and call ``LabelScreen.show_scores``."""

    def __init__(self, prompt_id: int, completions: list[Any]) -> None:
        super().__init__()
        self.prompt_id = prompt_id
        self.completions = completions


class LabelRecorded(Message):
    """A label went into the store (bubbles to the app); a scripted labeler's
    batch of labels is one message with no single comparison id."""

    def __init__(self, comparison_id: int | None, kind: str) -> None:
        super().__init__()
        self.comparison_id = comparison_id
        self.kind = kind


class LabelUndone(Message):
    """The last label and its pairs were removed (bubbles to the app)."""

    def __init__(self, comparison_id: int) -> None:
        super().__init__()
        self.comparison_id = comparison_id
