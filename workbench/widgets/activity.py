"""A line that shows long work is under way: a turning mark, what is happening,
and for how long. Used while the model loads and while completions are sampled.

Not Textual's indeterminate ProgressBar: it repaints 15 times a second, and on
two cores shared with sampling and a training job each repaint took the event
loop from the keyboard (benchmarks/app.py). The mark turns with the seconds, twice a second."""

from __future__ import annotations

import time

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.timer import Timer
from textual.widgets import Label

SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


class Activity(Horizontal):
    """Hidden when idle; ``start`` shows it, ``stop`` hides it, ``fail`` keeps it
    up with the error in place of the bar."""

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self._text = ""
        self._started = 0.0
        self._timer: Timer | None = None

    def compose(self) -> ComposeResult:
        # No fraction done: neither loading nor generate reports one, and a bar
        # that pretends to know would lie.
        yield Label("", classes="activity-text")

    def on_mount(self) -> None:
        self.display = False

    @property
    def running(self) -> bool:
        return self.display and not self.has_class("-failed")

    def start(self, text: str) -> None:
        self._text = text
        self._started = time.monotonic()
        self.remove_class("-failed")
        self.display = True
        if self._timer is None:
            self._timer = self.set_interval(0.5, self._tick)
        self._tick()

    def update_text(self, text: str) -> None:
        self._text = text
        self._tick()

    def stop(self) -> None:
        self.display = False
        self._stop_timer()

    def fail(self, text: str) -> None:
        self._stop_timer()
        self.add_class("-failed")
        self.query_one(".activity-text", Label).update(text)
        self.display = True

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None

    def _tick(self) -> None:
        elapsed = time.monotonic() - self._started
        mark = SPINNER[int(elapsed * 2) % len(SPINNER)]
        self.query_one(".activity-text", Label).update(f"{mark} {elapsed:3.0f} s  {self._text}")
