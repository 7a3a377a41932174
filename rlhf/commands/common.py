"""What every command shares: the parser, option types and option groups (for
`rlhf` and the workbench alike), opening the database, talking on stderr.

A bad option value is refused while the options are parsed, in one line,
before a database opens or a model loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from rlhf.config_fields import from_dict
from rlhf.locations import DEFAULT_DB_NAME
from rlhf.store import Store

if TYPE_CHECKING:
    from rlhf.model_options import ModelOptions


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


def config_options(cls: type, *, types: dict[str, Callable[[str], Any]] | None = None) -> argparse.ArgumentParser:
    """A parent parser with one option per field of the settings dataclass
    ``cls``, built by ``transformers.HfArgumentParser`` from the fields (names,
    types, choices, help in the metadata; ``--lr``-style aliases too). Pass it as
    ``parents=[...]`` to ``add_parser``.

    An option left out stays out of the namespace (its default is SUPPRESS), so
    ``given_settings`` tells what was given: a PPO session takes what is not
    from its reward model or the session it resumes. The help says the field's
    default instead. HfArgumentParser types an option by its annotation only;
    ``types`` puts back a range check while parsing, before a model loads.
    (The parent's own option table keeps the snake_case spellings; only the
    option strings copied into the child count.)"""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(cls, add_help=False)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for action in parser._actions:
        if action.dest not in defaults:
            continue
        # One spelling, with dashes, as every other option of `rlhf` (HfArgumentParser adds --snake_case too).
        action.option_strings = [o for o in action.option_strings
                                 if not ("_" in o and o.replace("_", "-") in action.option_strings)]
        default = defaults[action.dest]
        if isinstance(action, argparse._StoreFalseAction):  # the --no-X twin of a bool that defaults to True
            action.help = f"turn off --{action.dest.replace('_', '-')}"
        elif "%(default)s" in (action.help or ""):
            action.help = action.help.replace("%(default)s", str(default))
        elif "(default" not in (action.help or "") and default is not None:  # an explained default keeps its words
            action.help = f"{action.help} (default {default})"
        action.default = argparse.SUPPRESS
        if types and action.dest in types and action.type is not None:
            action.type = types[action.dest]
    return parser


def given_settings(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` given on the command line (see ``config_options``)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model / --no-4bit / --device, the same for every command that loads a
    model; the help is ModelOptions' own. Spelt by hand rather than through
    ``config_options``: `--model` and `--no-4bit` read better than the field
    names (source, quantize) and every command has always taken them."""
    from rlhf.model_options import DTYPES, ModelOptions

    about = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(ModelOptions)}
    parser.add_argument("--model", dest="source", default=None, help=about["source"])
    parser.add_argument("--no-4bit", dest="quantize", action="store_false", default=None,
                        help="load the base in full precision instead of 4-bit NF4")
    parser.add_argument("--device", default=None, help=about["device"])
    parser.add_argument("--dtype", default=None, choices=DTYPES, help=about["dtype"])


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """--temperature / --top-p / --max-new-tokens: how the policy answers
    (rlhf.sampling_params.SamplingParams, whose defaults they take)."""
    from rlhf.sampling_params import SamplingParams

    base = SamplingParams()
    for flag, kind, value, about in (
            ("--temperature", positive, base.temperature, "sampling temperature"),
            ("--top-p", fraction, base.top_p, "nucleus sampling mass (1.0 = the full distribution)"),
            ("--max-new-tokens", at_least(1), base.max_new_tokens, "length budget in tokens")):
        parser.add_argument(flag, type=kind, default=value, help=f"{about} (default {value})")


def model_options(args: argparse.Namespace) -> ModelOptions:
    from rlhf.model_options import ModelOptions

    return from_dict(ModelOptions, {"source": args.source, "quantize": args.quantize, "device": args.device,
                                    "dtype": getattr(args, "dtype", None)}, "model")


# --- running a command ------------------------------------------------------------------


def open_db(args: argparse.Namespace, *, create: bool = False) -> Store:
    """The --db database. Only `init` creates one: elsewhere a mistyped path
    must not quietly become a new, empty database."""
    return Store(args.db, create=create)


def say(msg: str) -> None:
    """Progress and warnings go to stderr; stdout holds only results."""
    print(msg, file=sys.stderr)
