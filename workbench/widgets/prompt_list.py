"""The list of prompts beside the labeling area, labeled ones ticked."""

from __future__ import annotations

from rich.text import Text
from textual.message import Message
from textual.widgets import OptionList
from textual.widgets.option_list import Option, OptionDoesNotExist


class PromptList(OptionList):
    """Selecting a prompt posts ``PromptList.Chosen`` with its id."""

    class Chosen(Message):
        def __init__(self, prompt_id: int) -> None:
            super().__init__()
            self.prompt_id = prompt_id

    def fill(self, prompts: list[tuple[int, str, bool]], current: int | None) -> None:
        """(id, text, labeled) for each prompt; highlight the current one."""
        self.clear_options()
        self.add_options([Option(_line(pid, text, labeled), id=str(pid)) for pid, text, labeled in prompts])
        self.mark_current(current)

    def mark_current(self, current: int | None) -> None:
        if current is None:
            return
        try:
            index = self.get_option_index(str(current))
        except OptionDoesNotExist:  # the list is refilled after a prompt was added
            return
        self.highlighted = index
        self.scroll_to_highlight()

    def update_prompt(self, prompt_id: int, text: str, labeled: bool) -> None:
        try:
            self.replace_option_prompt(str(prompt_id), _line(prompt_id, text, labeled))
        except OptionDoesNotExist:  # not listed yet: the next fill shows it
            pass

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        if event.option.id is not None:
            self.post_message(self.Chosen(int(event.option.id)))


def _line(prompt_id: int, text: str, labeled: bool) -> Text:
    first = " ".join(text.split())
    return Text.assemble(("✓ " if labeled else "· ", "green" if labeled else "dim"),
                         (f"{prompt_id:>3} ", "dim"), first)
