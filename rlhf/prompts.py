"""Reading prompt files: plain text (one prompt a line) or JSONL (a ``prompt`` field).

Bad lines are reported with their line numbers and the good ones kept, so a
single typo in a long file costs one prompt, not the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from rlhf.store import Store
from rlhf.text_input import read_text_file, split_lines, text_problem

SAMPLE_PROMPTS = "default.jsonl"


@dataclass
class PromptFile:
    """What a prompt file held: the good prompts and a message per bad line."""

    prompts: list[str] = field(default_factory=list)
    meta: list[dict[str, Any] | None] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def read_prompt_file(path: str | Path) -> PromptFile:
    """Parse a .txt or .jsonl prompt file. Raises UserError when it cannot be read."""
    path = Path(path)
    lines = split_lines(read_text_file(path, "a prompt file: .txt (one prompt a line) or .jsonl"))
    result = PromptFile()
    jsonl = path.suffix.lower() in (".jsonl", ".json", ".ndjson")
    for number, line in enumerate(lines, start=1):
        if not line.strip() or (not jsonl and line.lstrip().startswith("#")):
            continue
        text, meta, error = _parse_json_line(line) if jsonl else (line.strip(), None, None)
        if error is None and text is not None:
            error = text_problem(text, "the prompt")
        if error is not None:
            result.errors.append(f"{path.name}:{number}: {error}")
            continue
        assert text is not None
        result.prompts.append(text)
        result.meta.append(meta)
    return result


def _parse_json_line(line: str) -> tuple[str | None, dict[str, Any] | None, str | None]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return None, None, f"not valid JSON ({e.msg} at column {e.colno})"
    if not isinstance(obj, dict):
        return None, None, 'expected an object with a "prompt" field'
    text = obj.get("prompt")
    if not isinstance(text, str) or not text.strip():
        return None, None, 'no non-empty "prompt" string'
    meta = {k: v for k, v in obj.items() if k != "prompt"} or None
    return text.strip(), meta, None


def add_prompt_file(store: Store, path: str | Path, source: str | None = None) -> tuple[int, int, PromptFile]:
    """Read a prompt file whole (a file that cannot be read changes nothing),
    then add its good prompts. Returns (added, already there, what was read)."""
    parsed = read_prompt_file(path)
    added, existing = store.add_prompts(parsed.prompts, source=source or str(path), meta=parsed.meta)
    return added, existing, parsed


def load_sample_prompts(store: Store) -> int:
    """A database without prompts gets the bundled sample prompts; returns how many."""
    if store.prompts():
        return 0
    added, _, _ = add_prompt_file(store, bundled_prompt_file(), source=f"sample_prompts/{SAMPLE_PROMPTS}")
    return added


def bundled_prompt_file(name: str = SAMPLE_PROMPTS) -> Path:
    """A file from ``sample_prompts/`` (shipped beside the package in a checkout,
    inside it when installed as a wheel)."""
    here = Path(__file__).resolve().parent.parent / "sample_prompts" / name
    if here.exists():
        return here
    packaged = resources.files("rlhf") / "sample_prompts" / name
    return Path(str(packaged))
