"""Preference pairs out of the store, in the formats other tools read.

Export writes TRL's preference format (one row per pair: ``prompt``, ``chosen``,
``rejected``; standard text or conversational message lists, see TRL's
"Dataset formats and types" guide) as JSONL, as Parquet, or as a ``datasets``
dataset saved with ``save_to_disk``: what ``rlhf.exchange_import`` reads back.
Files are written whole or not at all, so a reader never sees half of one.
"""

from __future__ import annotations

import json
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

from rlhf.chat import prompt_messages
from rlhf.errors import UserError
from rlhf.exchange_import import read_preference_file
from rlhf.store import Store

FORMATS = ("trl", "parquet", "hf")
# Extra columns each exported row carries unless metadata=False.
METADATA_COLUMNS = ("comparison_id", "policy_version", "labeler", "created_at", "source")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


def reimport_warning(out: str | Path) -> str | None:
    """Read an exported file back as `rlhf import` would: a line saying how many
    rows it would refuse, and why the first, or None when it takes them all.
    Labels can pair texts import refuses (an answer over the size limit or with
    a control character, two answers equal up to whitespace): say so at export,
    not when the file comes back short."""
    _, errors = read_preference_file(out)
    if not errors:
        return None
    return (f"{len(errors)} exported pairs would be refused by `rlhf import` "
            f"(the first: {errors[0].split(': ', 1)[-1]})")


def format_for(out: Path) -> str | None:
    """The export format an output name implies, if any."""
    suffix = out.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "trl"
    if suffix == ".parquet":
        return "parquet"
    if not suffix:
        return "hf"
    return None


def since_stamp(since: str | date | datetime | None) -> str | None:
    """A date or time (ISO 8601; naive means UTC) as the store's timestamp form,
    so that it compares as text with ``created_at``."""
    if since is None:
        return None
    if isinstance(since, str):
        try:
            since = datetime.fromisoformat(since.strip())
        except ValueError as e:
            raise UserError(f"--since {since!r} is not a date: use YYYY-MM-DD or YYYY-MM-DDTHH:MM") from e
    if not isinstance(since, datetime):
        since = datetime(since.year, since.month, since.day)
    if since.tzinfo is None:
        since = since.replace(tzinfo=timezone.utc)
    return since.astimezone(timezone.utc).isoformat(timespec="milliseconds")


def pair_rows(pairs: list[dict[str, Any]], *, conversational: bool = False,
              metadata: bool = True) -> list[dict[str, Any]]:
    """Store pairs as TRL preference rows (plus metadata columns)."""
    rows = []
    for p in pairs:
        if conversational:
            row: dict[str, Any] = {
                "prompt": prompt_messages(p["prompt"]),
                "chosen": [{"role": "assistant", "content": p["chosen"]}],
                "rejected": [{"role": "assistant", "content": p["rejected"]}],
            }
        else:
            row = {"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]}
        if metadata:
            row.update({k: p[k] for k in METADATA_COLUMNS})
        rows.append(row)
    return rows


def export_pairs(store: Store, out: str | Path, fmt: str, *, conversational: bool = False,
                 since: str | date | datetime | None = None, policy_version: int | None = None,
                 labeler: str | None = None, source: str | None = None, metadata: bool = True) -> int:
    """Write the selected pairs to ``out`` in ``fmt`` ('trl' JSONL, 'parquet', or
    'hf' = a ``datasets`` folder). Returns the number of rows written.

    Filters are ANDed: pairs created since a date, whose two completions both
    come from ``policy_version``, labeled by ``labeler``, from ``source``
    ('label', 'import', or an exact source such as 'import:file.jsonl')."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    out = Path(out)
    if not out.parent.exists():
        raise UserError(f"folder {out.parent} does not exist: create it or choose another output path")
    pairs = store.pairs(since=since_stamp(since), policy_version=policy_version, labeler=labeler, source=source)
    if not pairs:
        filters = {"since": since, "policy version": policy_version, "labeler": labeler, "source": source}
        shown = ", ".join(f"{k} {v}" for k, v in filters.items() if v is not None) or "no filters"
        raise UserError(f"no pairs match ({shown}) in {store.path}: label some first or loosen the filters")
    rows = pair_rows(pairs, conversational=conversational, metadata=metadata)
    {"trl": _write_jsonl, "parquet": _write_parquet, "hf": _write_dataset}[fmt](rows, out)
    return len(rows)


def _write_jsonl(rows: list[dict[str, Any]], out: Path) -> None:
    _refuse_folder(out)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(out)  # a reader never sees half a file


def _write_parquet(rows: list[dict[str, Any]], out: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    _refuse_folder(out)
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    tmp.replace(out)


def _write_dataset(rows: list[dict[str, Any]], out: Path) -> None:
    import datasets

    if out.exists() and not (out / "state.json").exists() and (out.is_file() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not a saved dataset: choose a new folder for --format hf")
    # No tqdm bar on stderr: it would draw over the app's screen.
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        datasets.Dataset.from_list(rows).save_to_disk(str(out))
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _refuse_folder(out: Path) -> None:
    if out.is_dir():
        raise UserError(f"{out} is a folder: pass a file name (or use --format hf for a dataset folder)")
