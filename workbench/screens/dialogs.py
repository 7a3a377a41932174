"""Small modal dialogs of the labeling screen: a prompt editor, the export and
import forms, the policy-version picker and the rule of a scripted labeler. Each returns its answer through ``dismiss``
(None when cancelled)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Input, Label, OptionList, Select, TextArea
from textual.widgets.option_list import Option

from rlhf.text_input import text_problem
from workbench.widgets.path_suggester import PathSuggester


class PromptEditor(ModalScreen[str | None]):
    """Add or edit one prompt. ctrl+s saves, escape cancels."""

    BINDINGS = [
        Binding("ctrl+s", "save", "Save"),
        Binding("escape", "cancel", "Cancel"),
    ]

    def __init__(self, title: str, text: str = "") -> None:
        super().__init__()
        self.title_text = title
        self.initial = text

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="prompt-editor"):
            yield Label(self.title_text, classes="dialog-title")
            yield TextArea(self.initial, id="prompt-text", soft_wrap=True)
            yield Label("", id="prompt-error", classes="dialog-error")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Save (ctrl+s)", variant="primary", id="save")
                yield Button("Cancel (esc)", id="cancel")

    def on_mount(self) -> None:
        self.query_one(TextArea).focus()

    def action_save(self) -> None:
        text = self.query_one(TextArea).text.strip()
        if not text:
            self.query_one("#prompt-error", Label).update("a prompt cannot be empty")
            return
        problem = text_problem(text, "the prompt")
        if problem:
            self.query_one("#prompt-error", Label).update(problem)
            return
        self.dismiss(text)

    def action_cancel(self) -> None:
        self.dismiss(None)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.action_save() if event.button.id == "save" else self.action_cancel()


@dataclass
class ExportRequest:
    fmt: str
    path: Path
    conversational: bool


EXPORT_FORMATS = [
    ("TRL preference JSONL (prompt, chosen, rejected)", "trl"),
    ("Parquet", "parquet"),
    ("datasets folder (save_to_disk)", "hf"),
]
DEFAULT_NAMES = {"trl": "preferences.jsonl", "parquet": "preferences.parquet", "hf": "preferences-dataset"}


class ExportDialog(ModalScreen[ExportRequest | None]):
    """Format, output path and the conversational switch of an export."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="export-dialog"):
            yield Label("Export recorded pairs", classes="dialog-title")
            yield Select(EXPORT_FORMATS, value="trl", allow_blank=False, id="export-format")
            yield Input(str(self.folder / DEFAULT_NAMES["trl"]), id="export-path")
            yield Checkbox("conversational (message lists instead of plain text)", id="export-conversational")
            yield Label("", id="export-error", classes="dialog-error")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Export", variant="primary", id="export")
                yield Button("Cancel (esc)", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#export-path", Input).focus()  # enter exports at once

    def on_select_changed(self, event: Select.Changed) -> None:
        # Follow the format with the default name, unless the user typed their own.
        path_input = self.query_one("#export-path", Input)
        current = Path(path_input.value)
        if current.name in DEFAULT_NAMES.values():
            path_input.value = str(current.with_name(DEFAULT_NAMES[str(event.value)]))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self._submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self._submit() if event.button.id == "export" else self.action_cancel()

    def _submit(self) -> None:
        raw = self.query_one("#export-path", Input).value.strip()
        if not raw:
            self.query_one("#export-error", Label).update("give an output path")
            return
        self.dismiss(ExportRequest(
            fmt=str(self.query_one("#export-format", Select).value),
            path=Path(raw).expanduser(),
            conversational=self.query_one("#export-conversational", Checkbox).value,
        ))

    def action_cancel(self) -> None:
        self.dismiss(None)


@dataclass
class ImportRequest:
    path: Path
    label_prompts: bool


# What rlhf.exchange_import reads, completed first (a datasets folder is a folder).
IMPORT_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".gz")


class ImportDialog(ModalScreen[ImportRequest | None]):
    """A preference file to import, with path completion (right arrow takes it),
    and whether its prompts join the labeling queue."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="import-dialog"):
            yield Label("Import preference pairs", classes="dialog-title")
            yield Label("TRL JSONL or Parquet, a datasets folder, or HH-RLHF transcripts; → completes the path",
                        classes="dialog-hint")
            yield Input(placeholder="path/to/preferences.jsonl", suggester=PathSuggester(IMPORT_SUFFIXES),
                        id="import-path")
            yield Checkbox("also put its prompts in the labeling queue", id="import-label")
            yield Label("", id="import-error", classes="dialog-error")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Import", variant="primary", id="import")
                yield Button("Cancel (esc)", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#import-path", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self._submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self._submit() if event.button.id == "import" else self.action_cancel()

    def _submit(self) -> None:
        raw = self.query_one("#import-path", Input).value.strip()
        path = Path(raw).expanduser()
        if not raw or not path.exists():
            self.query_one("#import-error", Label).update(f"no file or folder {raw!r}: type a path (→ completes it)"
                                                          if raw else "give the path of a preference file")
            return
        self.dismiss(ImportRequest(path=path, label_prompts=self.query_one("#import-label", Checkbox).value))

    def action_cancel(self) -> None:
        self.dismiss(None)


# What the labeling queue samples from: (policy version, best-of-N or None); 0 is the base model.
Source = tuple[int, "int | None"]


class VersionPicker(ModalScreen["Source | None"]):
    """Choose what to sample from: a policy version (0 is the base model), or
    best-of-N of the base picked by the reward model."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, versions: list[tuple[Source, str]], current: Source) -> None:
        super().__init__()
        self.versions = versions
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="version-picker"):
            yield Label("Sample from", classes="dialog-title")
            yield OptionList(*[Option(f"{'● ' if source == self.current else '  '}{about}", id=str(i))
                               for i, (source, about) in enumerate(self.versions)], id="versions")
            yield Label("enter: choose · escape: cancel", classes="dialog-hint")

    def on_mount(self) -> None:
        options = self.query_one(OptionList)
        options.highlighted = next((i for i, (s, _) in enumerate(self.versions) if s == self.current), 0)
        options.focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        assert event.option.id is not None
        self.dismiss(self.versions[int(event.option.id)][0])

    def action_cancel(self) -> None:
        self.dismiss(None)


class RuleDialog(ModalScreen[str | None]):
    """The rule a scripted labeler labels by (rlhf.rules); checked before it closes."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def compose(self) -> ComposeResult:
        from rlhf.rules import BUILT_IN

        with Vertical(classes="dialog", id="rule-dialog"):
            yield Label("Label every comparison waiting for a label, by a rule", classes="dialog-title")
            yield Label(f"Built in: {', '.join(BUILT_IN)}; or module:function (text in, number out). "
                        "Labels are recorded as rule:NAME.", classes="dialog-hint", markup=False)
            yield Input(placeholder="e.g. contains=you   more=\\d   fewer=\\bI\\b", id="rule-text")
            yield Label("", id="rule-error", classes="dialog-error")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Label", variant="primary", id="label")
                yield Button("Cancel (esc)", id="cancel")

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self._submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self._submit() if event.button.id == "label" else self.action_cancel()

    def _submit(self) -> None:
        from rlhf.errors import UserError
        from rlhf.rules import parse_rule

        text = self.query_one(Input).value.strip()
        try:
            parse_rule(text)
        except UserError as e:
            self.query_one("#rule-error", Label).update(str(e))
            return
        self.dismiss(text)

    def action_cancel(self) -> None:
        self.dismiss(None)
