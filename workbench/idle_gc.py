"""Full garbage collections while the keyboard rests, not in the middle of a key press.

torch, transformers and the model are about 600,000 long-lived objects that
every full collection walked again: 300-420 ms in which no key was answered
(benchmarks/app.py, two cores shared with sampling and a training job). Once the
model is loaded they are frozen: collections skip them (the gc module's advice
for long-lived heaps). What is left is Textual's render caches, 90,000 to
200,000 objects that a full pass still takes 20-220 ms over; automatic full
passes are turned off and the app runs one itself when no key or click has come
for a while. The young generations are collected as usual.
"""

from __future__ import annotations

import gc
import time

IDLE_S = 2.0        # no input for this long: a pause the labeler will not notice
EVERY_S = 15.0      # how often the app looks for such a pause
NO_AUTOMATIC_FULL_PASS = 1_000_000  # gen-1 collections between full passes: never, in practice


def freeze_long_lived() -> None:
    """Call once the model is loaded: freeze what exists, hand full passes to ``IdleCollector``."""
    gc.freeze()
    young, middle, _full = gc.get_threshold()
    gc.set_threshold(young, middle, NO_AUTOMATIC_FULL_PASS)


class IdleCollector:
    """The app notes each input (``touched``) and asks now and then (``maybe_collect``)."""

    def __init__(self) -> None:
        self.last_input = time.monotonic()

    def touched(self) -> None:
        self.last_input = time.monotonic()

    def maybe_collect(self) -> bool:
        """A full collection if input has rested for ``IDLE_S``; True when one ran."""
        if time.monotonic() - self.last_input < IDLE_S:
            return False
        gc.collect()
        return True
