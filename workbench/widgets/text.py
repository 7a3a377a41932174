"""Small text helpers shared by the tables of several screens."""

from __future__ import annotations


def one_line(text: str, width: int) -> str:
    """``text`` on one line (whitespace collapsed), cut to ``width`` with an ellipsis."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[:width - 1] + "…"
