"""What every full screen of the workbench shares: the header and footer around
its body, the app as ``wb``, and its workers' failures reported by the app (the
model host's workers too: they run on the screen that asked)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import Footer, Header
from textual.worker import Worker, WorkerState

if TYPE_CHECKING:
    from workbench.app import WorkbenchApp


class WorkbenchScreen(Screen[None]):
    """A screen of the workbench. Subclasses compose their body in ``compose_body``."""

    @property
    def wb(self) -> WorkbenchApp:
        return cast("WorkbenchApp", self.app)

    def compose(self) -> ComposeResult:
        yield Header()
        yield from self.compose_body()
        yield Footer()

    def compose_body(self) -> ComposeResult:
        yield from ()

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        # A worker's messages go to the node that started it and do not bubble:
        # hand them to the one place that reports failures.
        self.wb.report_worker_failure(event.worker)
        if event.worker.state is WorkerState.ERROR:
            self.worker_failed(event.worker)

    def worker_failed(self, worker: Worker[Any]) -> None:
        """Put this screen right after one of its workers raised (the app has
        already said what went wrong): a screen waiting for an answer stops waiting."""
