"""Path completion for an Input: the rest of the first file or folder whose name
starts with what was typed, shown greyed after the cursor (right arrow takes
it). Textual's own suggesters complete from a list; the file system changes
under the dialog, so this one reads the folder each time (no cache)."""

from __future__ import annotations

import os
from pathlib import Path

from textual.suggester import Suggester


class PathSuggester(Suggester):
    """Suggests the first entry of the typed folder that completes the typed
    name: folders end in '/', hidden entries only when a '.' was typed, and
    names with one of ``suffixes`` before the others."""

    def __init__(self, suffixes: tuple[str, ...] = ()) -> None:
        super().__init__(use_cache=False, case_sensitive=True)
        self.suffixes = suffixes

    async def get_suggestion(self, value: str) -> str | None:
        if not value:
            return None
        folder_text, slash, prefix = value.rpartition("/")
        folder = Path(os.path.expanduser(folder_text or "/")) if slash else Path(".")
        try:
            entries = [(e.name, e.is_dir()) for e in os.scandir(folder)]
        except OSError:
            return None
        hidden_ok = prefix.startswith(".")
        candidates = [(name, is_dir) for name, is_dir in entries
                      if name.startswith(prefix) and name != prefix and (hidden_ok or not name.startswith("."))]
        if not candidates:
            return None

        def rank(entry: tuple[str, bool]) -> tuple[int, str]:
            name, is_dir = entry
            return (0 if not is_dir and name.endswith(self.suffixes) else 1 if is_dir else 2, name)

        name, is_dir = min(candidates, key=rank)
        return value + name[len(prefix):] + ("/" if is_dir else "")
