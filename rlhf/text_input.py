"""What counts as text the workbench accepts, and how a text file is read line by line.

One size limit and one character rule serve every way text comes in (prompt
files, the prompt editor, imported pairs), so a text that one path accepts
another never refuses.
"""

from __future__ import annotations

import codecs
import re
from pathlib import Path

from rlhf.errors import UserError

# Characters in a prompt or a completion. Generous for a prompt or an HH
# transcript (the longest text of the bundled HH-RLHF sample is 4,327), and far
# beyond the tokens the model reads, which the tokenizer truncates anyway.
MAX_TEXT_CHARS = 8000
# C0 control characters and DEL, except tab, newline and carriage return: never
# in text a person wrote, always in binary. C1 characters (U+0080-U+009F, e.g.
# U+0085 NEXT LINE) are left alone: they appear in real exported text.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
BOM = "\ufeff"


def text_problem(text: str, what: str = "the text") -> str | None:
    """Why ``text`` cannot be stored, or None when it can."""
    if len(text) > MAX_TEXT_CHARS:
        return f"{what} is {len(text)} characters; the limit is {MAX_TEXT_CHARS}"
    found = _CONTROL.search(text)
    if found:
        return f"{what} holds control character U+{ord(found.group()):04X} at position {found.start() + 1}: not text"
    return None


def split_lines(text: str) -> list[str]:
    """Lines as a file means them: split on newline (``\\r\\n`` too) only.

    Not ``str.splitlines()``: it also breaks at U+2028, U+2029, U+0085 and other
    separators, which a JSON writer leaves raw inside strings, so a row holding
    one would be cut in two."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def decode_text(data: bytes, path: Path | str) -> str:
    """A file's bytes as text: UTF-8, a leading byte-order mark dropped. Raises
    UserError for anything else, or for binary (a NUL byte is never in text)."""
    for bom, name in ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
                      (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16")):
        if data.startswith(bom):  # what Windows tools call "Unicode": NUL bytes, yet text
            raise UserError(f"{path} is {name} text: save it as UTF-8")
    if b"\x00" in data:
        raise UserError(f"{path} looks like a binary file (it holds NUL bytes): pass a UTF-8 text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): save it as UTF-8") from e
    return text.removeprefix(BOM)


def read_text_file(path: Path | str, expected: str = "a UTF-8 text file") -> str:
    """A UTF-8 text file's contents; one-line UserErrors, saying what was
    ``expected``, for what cannot be read."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder: pass {expected}")
    if not path.exists():
        raise UserError(f"{path} does not exist: pass {expected}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}): check its permissions") from e
    return decode_text(data, path)


def error_summary(errors: list[str], shown: int = 5) -> list[str]:
    """'skipped <message>' for the first ``shown`` bad lines and a count of the
    rest: a file of ten thousand bad rows should not print ten thousand lines."""
    lines = [f"skipped {error}" for error in errors[:shown]]
    if len(errors) > shown:
        lines.append(f"... and {len(errors) - shown} more skipped")
    return lines
