"""The progress line under the header: how far labeling has come, which policy
version is sampled, and how often the reward model agrees with the labeler."""

from __future__ import annotations

from rich.console import Console, ConsoleOptions, RenderResult
from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static


class StatusLine(Static):
    labeled: reactive[int] = reactive(0)
    total: reactive[int] = reactive(0)
    pairs: reactive[int] = reactive(0)
    policy_version: reactive[int] = reactive(0)
    best_of: reactive[int | None] = reactive(None)
    # Filled by the reward model once one exists: "71% of 120 labels", say.
    agreement: reactive[str | None] = reactive(None)
    # The labeler against their earlier self on repeated comparisons (rlhf.consistency), once there are some.
    self_agreement: reactive[str] = reactive("—")
    mode: reactive[str] = reactive("pick best")
    next_state: reactive[str] = reactive("")
    order: reactive[str] = reactive("")   # which prompt comes next, where not as added
    _rows_asked = 0                       # the height last asked of the layout

    def render(self) -> ItemLine:
        def item(label: str, value: str, style: str = "bold") -> Text:
            return Text.assemble((label, "dim"), (value, style))

        items = [
            item("labeled ", f"{self.labeled}/{self.total}"),
            item("remaining ", f"{self.total - self.labeled}"),
            item("pairs ", f"{self.pairs}"),
            item("policy ", (f"best-of-{self.best_of} of " if self.best_of else "") + f"v{self.policy_version}"
                 + (" (base)" if self.policy_version == 0 else "")),
            item("RM agrees ", self.agreement or "—", "bold" if self.agreement else "dim"),
        ]
        if self.self_agreement != "—":
            items.append(item("you agree with you ", self.self_agreement))
        items.append(item("mode ", self.mode))
        if self.order:
            items.append(item("order ", self.order))
        if self.next_state:
            items.append(item("next ", self.next_state, ""))
        line = ItemLine(items)
        width, height = self.content_size
        rows = len(line.lines(width)) if width else height
        if rows != height and rows != self._rows_asked:
            # A fact grew or went and moved a line break: the height follows (once
            # per change, should the screen not give it). Only then, since laying
            # out the screen at every key would cost ~40 ms.
            self._rows_asked = rows
            self.refresh(layout=True)
        return line


class ItemLine:
    """Items in a row between separators, broken onto the next line only between
    two items where the width ends: "RM agrees 71% of" / "120 labels" reads as two
    facts. (Rich wraps a Text at any space; a renderable gets the width it is drawn
    at, both when Textual measures the height and when it draws.)"""

    SEPARATOR = ("  │  ", "dim")

    def __init__(self, items: list[Text]) -> None:
        self.items = items

    def __str__(self) -> str:
        return self.SEPARATOR[0].join(i.plain for i in self.items)

    def lines(self, width: int) -> list[Text]:
        lines = [Text()]
        for item in self.items:
            line = lines[-1]
            if line.cell_len and line.cell_len + len(self.SEPARATOR[0]) + item.cell_len > width:
                lines.append(line := Text())
            if line.cell_len:
                line.append(*self.SEPARATOR)
            line.append_text(item)
        return lines

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from self.lines(options.max_width)
