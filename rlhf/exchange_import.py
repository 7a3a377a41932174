"""Preference files into the store: TRL's preference format (standard text or
conversational message lists, as JSONL, Parquet or a ``datasets`` folder saved
with ``save_to_disk``), TRL's implicit-prompt rows and Anthropic HH-RLHF
transcripts, detected row by row. A bad row is reported with its place and
skipped; the good ones go in together, and a pair already there is not added twice.

How a prompt is kept: the store holds a prompt as text. A standard row keeps
its text; a conversational prompt of one user message keeps that message's
content; a longer conversation is written as an HH transcript
(``\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nAssistant:``, ``rlhf.chat``). HH
transcripts are kept exactly as they are in the file (everything up to and
including the last shared ``\\n\\nAssistant:``), so a standard export gives back
the same text; a conversational export turns such a transcript back into
messages (``rlhf.chat.prompt_messages``). One asymmetry, by design: a one-turn HH
prompt exported as messages re-imports as its plain question (one user message),
not as a transcript.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.chat import ASSISTANT, HUMAN, render_transcript
from rlhf.errors import UserError
from rlhf.store import IMPORT_SOURCE_PREFIX, Store
from rlhf.text_input import decode_text, split_lines, text_problem

_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class PreferencePair:
    """One preference as text: ``chosen`` was preferred to ``rejected`` for ``prompt``."""

    prompt: str
    chosen: str
    rejected: str

    @property
    def key(self) -> str:
        """Content hash: the same pair from any file is stored once."""
        blob = json.dumps([self.prompt, self.chosen, self.rejected], ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass
class ImportReport:
    """What ``import_file`` did: pairs added, pairs already there, one message per bad row."""

    added: int = 0
    duplicates: int = 0
    errors: list[str] = field(default_factory=list)  # 'file:line: reason'
    source: str = ""  # what the pairs are marked with: 'import:<file name>'
    prompts: list[str] = field(default_factory=list)  # the file's prompts, once each, in file order


# --- conversational rows ------------------------------------------------------------


def _messages_prompt(messages: Any) -> tuple[str | None, str | None]:
    """A conversational prompt as stored text, or an error."""
    error = _check_messages(messages, "prompt")
    if error:
        return None, error
    if any(m["role"] == "system" for m in messages):
        return None, "system messages in the prompt are not supported (a prompt is stored as text): drop them"
    if messages[-1]["role"] != "user":
        return None, "the prompt's last message must be from the user"
    if len(messages) == 1:
        return messages[0]["content"], None
    return render_transcript(messages), None


def _reply_text(messages: Any, name: str) -> tuple[str | None, str | None]:
    """The text of a one-message assistant reply, or an error."""
    error = _check_messages(messages, name)
    if error:
        return None, error
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        roles = ", ".join(m["role"] for m in messages)
        return None, f"{name} must be one assistant message, got [{roles}]"
    return messages[0]["content"], None


def _check_messages(messages: Any, name: str) -> str | None:
    if not isinstance(messages, list) or not messages:
        return f"{name} must be a non-empty list of messages"
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            return f"{name} holds a message that is not {{'role': user|assistant|system, 'content': text}}"
    return None


# --- reading rows ------------------------------------------------------------------


def parse_row(row: Any) -> tuple[PreferencePair | None, str | None]:
    """One row of a preference file as a pair, or the reason it is not one.

    Detected per row: TRL standard (``prompt``, ``chosen``, ``rejected`` text),
    TRL conversational (message lists), and implicit prompts (only ``chosen`` and
    ``rejected``: HH-RLHF transcripts, or text / messages sharing a prefix)."""
    if not isinstance(row, dict):
        return None, "expected an object with 'chosen' and 'rejected'"
    missing = [k for k in ("chosen", "rejected") if row.get(k) is None]
    if missing:
        return None, f"missing {' and '.join(repr(k) for k in missing)}"
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if prompt is None:
        pair, error = _implicit_pair(chosen, rejected)
    elif all(isinstance(v, str) for v in (prompt, chosen, rejected)):
        pair, error = PreferencePair(prompt, chosen, rejected), None
    elif all(isinstance(v, list) for v in (prompt, chosen, rejected)):
        pair, error = _conversational_pair(prompt, chosen, rejected)
    else:
        return None, "prompt, chosen and rejected must all be text or all be message lists"
    if pair is None:
        return None, error
    problem = pair_problem(pair)
    return (None, problem) if problem else (pair, None)


def pair_problem(pair: PreferencePair) -> str | None:
    """Why a parsed pair cannot be stored as a preference, or None."""
    if not pair.prompt.strip():
        return "the prompt is empty"
    for name in ("prompt", "chosen", "rejected"):
        problem = text_problem(getattr(pair, name), name)
        if problem:
            return problem
    if pair.chosen.split() == pair.rejected.split():
        # Nothing a reward model could learn, and nothing a labeler could see.
        return "chosen and rejected are the same text (up to whitespace)"
    return None


def _conversational_pair(prompt: Any, chosen: Any, rejected: Any) -> tuple[PreferencePair | None, str | None]:
    text, error = _messages_prompt(prompt)
    if error:
        return None, error
    chosen_text, error = _reply_text(chosen, "chosen")
    if error:
        return None, error
    rejected_text, error = _reply_text(rejected, "rejected")
    if error:
        return None, error
    assert text is not None and chosen_text is not None and rejected_text is not None
    return PreferencePair(text, chosen_text, rejected_text), None


def _implicit_pair(chosen: Any, rejected: Any) -> tuple[PreferencePair | None, str | None]:
    if isinstance(chosen, list) and isinstance(rejected, list):
        # TRL's extract_prompt: the shared leading messages are the prompt.
        error = _check_messages(chosen, "chosen") or _check_messages(rejected, "rejected")
        if error:
            return None, error
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            return None, "chosen and rejected share no leading messages to serve as the prompt"
        return _conversational_pair(chosen[:n], chosen[n:], rejected[n:])
    if not (isinstance(chosen, str) and isinstance(rejected, str)):
        return None, "chosen and rejected must both be text or both be message lists"
    shared = len(os.path.commonprefix([chosen, rejected]))
    cut = chosen.rfind(ASSISTANT, 0, shared)
    if cut >= 0:
        # HH-RLHF: the prompt is the dialogue up to and including the last
        # "\n\nAssistant:" both sides share (in a well-formed pair, the last of
        # each), kept as is; the replies are the remainders, stripped of the
        # space that follows the colon.
        end = cut + len(ASSISTANT)
        return PreferencePair(chosen[:end], chosen[end:].strip(), rejected[end:].strip()), None
    if any(text.lstrip().startswith(HUMAN.strip()) for text in (chosen, rejected)):
        # A transcript cut at a common prefix would split mid-word.
        return None, ("an HH transcript with no shared '\\n\\nAssistant:' turn: the prompt and the answers "
                      "cannot be told apart; give the row a 'prompt' field")
    # Other implicit-prompt text: TRL's extract_prompt (the common prefix, minus a
    # trailing space, which stays with the completions).
    if shared and chosen[shared - 1] == " ":
        shared -= 1
    if shared == 0:
        return None, "chosen and rejected share no prompt (no 'prompt' field and no common beginning)"
    return PreferencePair(chosen[:shared], chosen[shared:], rejected[shared:]), None


def _rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(place, row) for every row of a JSONL (optionally .gz) file, a JSON list,
    a Parquet file or a ``save_to_disk`` folder; place is 'file:line'."""
    if path.is_dir():
        yield from _dataset_rows(path)
    elif path.suffix.lower() == ".parquet":
        yield from _parquet_rows(path)
    else:
        yield from _json_rows(path)


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read {path} ({e}): check the file") from e
    text = decode_text(data, path)
    if text.lstrip().startswith("["):
        # A whole-file JSON list (as `datasets` .to_json(lines=False) writes).
        try:
            rows = json.loads(text)
        except json.JSONDecodeError:
            rows = None
        if isinstance(rows, list):
            for number, row in enumerate(rows, start=1):
                yield f"{path.name}:item {number}", row
            return
    for number, line in enumerate(split_lines(text), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            row = _BadJson(f"not valid JSON ({e.msg} at column {e.colno})")
        yield f"{path.name}:{number}", row


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"cannot read {path} as Parquet ({e}): check the file") from e
    for number, row in enumerate(table.to_pylist(), start=1):
        yield f"{path.name}:row {number}", row


def _dataset_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise UserError(f"{path} is a folder but not a dataset saved with save_to_disk ({e}): "
                        "pass a .jsonl or .parquet file or such a folder") from e
    splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    for split, dataset in splits:
        name = path.name if split is None else f"{path.name}[{split}]"
        for number, row in enumerate(dataset, start=1):
            yield f"{name}:row {number}", row


@dataclass(frozen=True)
class _BadJson:
    reason: str


def read_preference_file(path: str | Path) -> tuple[list[PreferencePair], list[str]]:
    """Parse a preference file without touching the store: the good pairs, in
    file order, and a 'file:line: reason' message for each bad row.

    Raises UserError when the file is missing or cannot be read at all."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist: pass a .jsonl, .parquet or save_to_disk dataset folder "
                        "with 'chosen' and 'rejected' (and 'prompt') columns")
    pairs: list[PreferencePair] = []
    errors: list[str] = []
    for place, row in _rows(path):
        if isinstance(row, _BadJson):
            pair, error = None, row.reason
        else:
            pair, error = parse_row(row)
        if pair is None:
            errors.append(f"{place}: {error}")
        else:
            pairs.append(pair)
    return pairs, errors


def import_file(store: Store, path: str | Path) -> ImportReport:
    """Add the pairs of a preference file to the store, marked with source
    'import:<file name>'. Pairs already there (same prompt, chosen and rejected,
    from any file) are counted as duplicates and not added again; bad rows are
    reported and the good ones kept."""
    path = Path(path)
    pairs, errors = read_preference_file(path)
    source = f"{IMPORT_SOURCE_PREFIX}{path.name}"
    added = store.add_imported_pairs([(p.prompt, p.chosen, p.rejected, p.key) for p in pairs], source)
    return ImportReport(added=added, duplicates=len(pairs) - added, errors=errors, source=source,
                        prompts=list(dict.fromkeys(p.prompt for p in pairs)))


def import_summary(report: ImportReport, path: str | Path) -> str:
    """The one line `rlhf import` and the workbench's import dialog both report."""
    return (f"imported {report.added} pairs from {path} as {report.source} "
            f"({report.duplicates} already there, {len(report.errors)} bad rows skipped)")


def offer_for_labeling(store: Store, report: ImportReport) -> int:
    """Put an import's prompts in the labeling queue (imported prompts stay out of
    it until asked), their imported pairs kept. Returns how many joined it: those
    already the researcher's own are not counted."""
    added, _ = store.add_prompts(report.prompts, source=f"offered:{report.source}")
    return added
