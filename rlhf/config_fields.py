"""How a job's settings are declared and read back.

Each job kind has a dataclass of settings (``PPOConfig``, ``RewardConfig``), one
field per setting with its help text in the field's metadata, where
``transformers.HfArgumentParser`` finds it: the command line builds its options
from the dataclass (``rlhf.commands.common.config_options``) and the app takes
its defaults from it, so a default is written once. Settings travel to a job as
the JSON config of its row; ``from_dict`` reads them back by one rule for every
kind: an unknown key is an error (a misspelt setting must not be dropped
silently), and None stands for the default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, field, fields
from typing import Any, TypeVar

from rlhf.errors import UserError

T = TypeVar("T")


def setting(default: Any = MISSING, *, help: str, **options: Any) -> Any:
    """A dataclass field whose help text (and any argparse keyword
    HfArgumentParser passes on, e.g. ``aliases=["--lr"]``) is declared with it."""
    return field(default=default, metadata={"help": help, **options})


def known(cls: type, values: Mapping[str, Any], what: str) -> dict[str, Any]:
    """The settings in ``values`` that are set (None: the default), refusing
    any that is not a field of ``cls``."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"unknown {what} setting(s) {', '.join(unknown)}: known are {', '.join(sorted(names))}")
    return {k: v for k, v in values.items() if v is not None}


def from_dict(cls: type[T], values: Mapping[str, Any], what: str) -> T:
    """``cls`` from the settings in ``values`` (see ``known``)."""
    return cls(**known(cls, values, what))
