"""One completion in its column: number, token count, finish reason, score."""

from __future__ import annotations

from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.message import Message
from textual.widgets import Static

from rlhf.rows import Completion


class CompletionCard(VerticalScroll, can_focus=False):
    """A bordered, scrollable column. Clicking it posts ``CompletionCard.Clicked``."""

    class Clicked(Message):
        def __init__(self, number: int) -> None:
            super().__init__()
            self.number = number  # 1-based, as the keys

    def __init__(self, number: int, *, id: str | None = None) -> None:
        super().__init__(id=id, classes="card")
        self.number = number
        self.completion: Completion | None = None
        self.score: float | None = None
        self.rank: int | None = None

    def compose(self) -> ComposeResult:
        yield Static("", classes="card-body", markup=False)

    def show(self, completion: Completion | None) -> None:
        self.completion = completion
        self.score = None
        self.rank = None
        body = Text(completion.text if completion else "")
        if completion is not None and completion.finish_reason == "length":
            body.append(" ✂ cut", "bold red")
        self.query_one(".card-body", Static).update(body)
        self.set_class(completion is not None and completion.finish_reason == "length", "-cut")
        self.scroll_home(animate=False)
        self._titles()

    def set_score(self, score: float | None) -> None:
        self.score = score
        self._titles()

    def set_rank(self, rank: int | None) -> None:
        self.rank = rank
        self.set_class(rank is not None, "-ranked")
        self._titles()

    def _titles(self) -> None:
        title = Text.assemble((f" {self.number} ", "bold reverse"))
        if self.rank is not None:
            title.append(f"  rank {self.rank} ", "bold")
        if self.score is not None:
            # In the title, not the subtitle: a narrow column cuts the subtitle first.
            title.append(f"  score {self.score:+.2f} ", "bold")
        self.border_title = title
        c = self.completion
        if c is None:
            self.border_subtitle = ""
            return
        sub = Text(f"{c.n_tokens} tok · ")
        if c.finish_reason == "length":
            sub.append("CUT", "bold red")  # stopped at max_new_tokens without EOS
        else:
            sub.append(c.finish_reason)
        self.border_subtitle = sub

    def on_click(self, event: events.Click) -> None:
        if self.completion is not None:
            self.post_message(self.Clicked(self.number))
