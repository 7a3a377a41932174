"""What every command shares: the parser, option types and option groups (for
`rlhf` and the workbench alike), opening the database, talking on stderr.

A bad option value is refused while the options are parsed, in one line,
before a database opens or a model loads.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from rlhf.locations import DEFAULT_DB_NAME
from rlhf.store import Store

if TYPE_CHECKING:
    from rlhf.models import ModelOptions


class Parser(argparse.ArgumentParser):
    """argparse, with a bad option told in one line: the whole usage (fifteen
    lines for `rlhf ppo`) would bury the line that says what is wrong."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# --- option types ------------------------------------------------------------------


def at_least(minimum: int, *, at_most: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number no smaller than ``minimum`` (and no larger than ``at_most``)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum or (at_most is not None and value > at_most):
            span = f"at least {minimum}" if at_most is None else f"from {minimum} to {at_most}"
            raise argparse.ArgumentTypeError(f"must be {span}, got {value}")
        return value
    return parse


def positive(text: str) -> float:
    """An argparse type: a number above zero."""
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def fraction(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 1, got {text}")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


# --- shared option groups ----------------------------------------------------------


def database_file(text: str) -> Path:
    """An argparse type: a path that is not empty (``Path("")`` would be the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the path is empty: pass a database file, e.g. --db workbench.db")
    return Path(text)


def add_db_option(parser: argparse.ArgumentParser, note: str = "") -> None:
    """--db, the same for the CLI and the workbench."""
    parser.add_argument(
        "--db", type=database_file, default=None,
        help=f"database file (default: ./{DEFAULT_DB_NAME} when it exists, else {DEFAULT_DB_NAME} in the "
             f"user's data directory, e.g. ~/.local/share/rlhf-workbench/){note}")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model / --no-4bit / --device, the same for every command that loads a model."""
    parser.add_argument("--model", default="embedded",
                        help="base model: 'embedded' (SmolLM2-135M-Instruct, the default), a model "
                             "directory, a .gguf file, or a hub id")
    parser.add_argument("--no-4bit", dest="quantize", action="store_false", default=None,
                        help="load the base in full precision instead of 4-bit NF4")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when available)")


def add_sampling_options(parser: argparse.ArgumentParser, *, defaults: bool = True) -> None:
    """--temperature / --top-p / --max-new-tokens: how the policy answers. With
    ``defaults`` an unset option takes rlhf.sampling.SamplingParams' value, else it
    stays None (PPO then takes its reward model's definition)."""
    from rlhf.sampling_params import SamplingParams

    base = SamplingParams()
    for flag, kind, value, about in (
            ("--temperature", positive, base.temperature, "sampling temperature"),
            ("--top-p", fraction, base.top_p, "nucleus sampling mass (1.0 = the full distribution)"),
            ("--max-new-tokens", at_least(1), base.max_new_tokens, "length budget in tokens")):
        note = f"default {value}" if defaults else f"default: as the reward model's labels were sampled, else {value}"
        parser.add_argument(flag, type=kind, default=value if defaults else None, help=f"{about} ({note})")


def model_options(args: argparse.Namespace) -> ModelOptions:
    from rlhf.models import ModelOptions  # here: torch takes seconds to import, `rlhf --help` none

    return ModelOptions(source=args.model, quantize=args.quantize, device=args.device)


# --- running a command ------------------------------------------------------------------


def open_db(args: argparse.Namespace, *, create: bool = False) -> Store:
    """The --db database. Only `init` creates one: elsewhere a mistyped path
    must not quietly become a new, empty database."""
    return Store(args.db, create=create)


def say(msg: str) -> None:
    """Progress and warnings go to stderr; stdout holds only results."""
    print(msg, file=sys.stderr)
