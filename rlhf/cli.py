"""The headless command line: everything the workbench does, without a screen.

    rlhf [--db PATH] init | prompts add FILE | sample | label | stats | jobs | ...

Each command group lives in a module of ``rlhf/commands/`` that offers
``register(subparsers)`` and imports the heavy engine (torch) only inside its
handlers, so ``rlhf --help`` stays fast. Errors a user can cause print one line
(``rlhf: error: ...``) and exit 2; a traceback means a bug of ours.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from collections.abc import Sequence

from rlhf.commands import (dpo, drift, evaluation, exchange, handover, ppo, prompts, reward, rollouts, sampling,
                           status)
from rlhf.commands.common import Parser, add_db_option
from rlhf.errors import UserError
from rlhf.locations import default_db_path

# In the order `rlhf --help` lists them.
COMMAND_GROUPS = (prompts, sampling, status, exchange, reward, ppo, rollouts, dpo, drift, evaluation, handover)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="rlhf", description="RLHF workbench, headless: prompts, sampling, labels, training.")
    add_db_option(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.db is None:
        args.db = default_db_path()
    # Before torch loads: its OpenMP threads otherwise busy-wait, several times
    # slower when a background job shares the cores (measured in the workbench).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        return args.func(args)
    except UserError as e:
        print(f"rlhf: error: {e}", file=sys.stderr)
        return 2
    except sqlite3.DatabaseError as e:
        # What the checks on opening cannot foresee: another writer holding the
        # database past the busy timeout, a full disk, damage in pages a quick
        # check does not read.
        if "locked" in str(e):
            remedy = "another process kept it locked past the wait; try again when it is done"
        else:
            remedy = "check the disk, and the file with `sqlite3 FILE 'PRAGMA integrity_check'`"
        print(f"rlhf: error: the database {args.db} failed ({e}): {remedy}; what was committed before is kept",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlhf: interrupted; everything recorded so far is kept", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into a reader that stopped early (`rlhf stats | head`): not
        # an error. Point stdout at /dev/null so the exit's flush does not fail
        # again (the recipe of Python's `signal` documentation).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
