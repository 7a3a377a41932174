"""Disagreements: the labeled comparisons the reward model gets wrong, worst first.

"Worst" is the most confident mistake: the lowest r(chosen) − r(rejected). These
are where a researcher looks for a mislabel, an ambiguous prompt, or what the
reward model has latched onto instead (the start of over-optimization).
Scoring needs the model, so the model host does it in a worker; the table fills
when its answer comes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import DataTable, Static
from textual.worker import Worker

from workbench.messages import LabeledPairsScored
from workbench.screens.base import WorkbenchScreen
from workbench.widgets.text import one_line

if TYPE_CHECKING:
    from rlhf.reward_eval import LabeledPairScore

SNIPPET = 48


class DisagreementsScreen(WorkbenchScreen):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back", tooltip="Back to the Train screen"),
        Binding("r", "refresh", "Refresh", tooltip="Score the labeled pairs again"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[LabeledPairScore] = []
        self.n_pairs = 0

    def compose_body(self) -> ComposeResult:
        yield Static("scoring the labeled pairs…", id="disagree-status", markup=False)
        yield DataTable(id="disagree-table", cursor_type="row", zebra_stripes=True)
        with VerticalScroll(id="disagree-detail"):
            yield Static("", id="disagree-text", markup=False)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("margin", "prompt", "labeler chose", "over")
        self.action_refresh()

    def action_refresh(self) -> None:
        if self.wb.model_host.stack is None:
            self._status("The model is not loaded yet: scores need it. Try again when it is (r).")
            return
        if not self.wb.store.checkpoints("reward"):
            self._status("No reward model yet: train one on the Train screen (s).")
            return
        self._status("scoring the labeled pairs…")
        self.wb.model_host.score_labeled(self)

    def on_labeled_pairs_scored(self, message: LabeledPairsScored) -> None:
        from rlhf.reward_eval import disagreements

        if message.scored is None:
            self._status("No reward model could be loaded.")
            return
        self._show(disagreements(message.scored), len(message.scored), message.version)

    def worker_failed(self, worker: Worker[Any]) -> None:
        self._status(f"scoring failed: {worker.error}  (r tries again)")

    def _status(self, text: str) -> None:
        self.query_one("#disagree-status", Static).update(text)

    def _show(self, rows: list[LabeledPairScore], n_pairs: int, version: int | None) -> None:
        self.rows, self.n_pairs = rows, n_pairs
        table = self.query_one(DataTable)
        table.clear()
        for i, row in enumerate(rows):
            table.add_row(Text(f"{row.margin:+.2f}", style="bold red"), one_line(row.prompt, 40),
                          one_line(row.chosen, SNIPPET), one_line(row.rejected, SNIPPET), key=str(i))
        agree = n_pairs - len(rows)
        self._status(f"reward v{version}: agrees with {agree} of {n_pairs} labeled pairs; "
                     f"{len(rows)} disagreements, most confident first")
        self._detail(rows[0] if rows else None)
        if rows:
            table.focus()

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key.value is not None and int(event.row_key.value) < len(self.rows):
            self._detail(self.rows[int(event.row_key.value)])

    def _detail(self, row: Any) -> None:
        text = self.query_one("#disagree-text", Static)
        if row is None:
            text.update("Nothing to show: the reward model agrees with every labeled pair."
                        if self.n_pairs else "No labeled pairs yet.")
            return
        text.update(Text.assemble(
            ("Prompt\n", "bold"), row.prompt, "\n\n",
            (f"Labeler chose (score {row.chosen_score:+.2f})\n", "bold green"), row.chosen, "\n\n",
            (f"over (score {row.rejected_score:+.2f})\n", "bold red"), row.rejected))
