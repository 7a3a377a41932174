"""`rlhf init` and `rlhf prompts add|list`: the database and what it asks the model."""

from __future__ import annotations

import argparse
from pathlib import Path

from rlhf.commands.common import open_db, say
from rlhf.text_input import error_summary


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="create the database (and load the sample prompts)")
    p.add_argument("--no-samples", dest="with_samples", action="store_false",
                   help="do not load sample_prompts/default.jsonl")
    p.set_defaults(func=cmd_init)

    prompts = sub.add_parser("prompts", help="add or list prompts").add_subparsers(
        dest="prompts_command", required=True, metavar="ACTION")
    p = prompts.add_parser("add", help="add prompts from a .txt (one a line) or .jsonl ('prompt' field) file")
    p.add_argument("file", type=Path)
    p.set_defaults(func=cmd_prompts_add)
    p = prompts.add_parser("list", help="print prompt ids and texts")
    p.set_defaults(func=cmd_prompts_list)


def cmd_init(args: argparse.Namespace) -> int:
    from rlhf.prompts import load_sample_prompts

    with open_db(args, create=True) as store:
        added = load_sample_prompts(store) if args.with_samples else 0
        print(f"database {store.path} ready (schema {store.schema_version}); {added} sample prompts added")
    return 0


def cmd_prompts_add(args: argparse.Namespace) -> int:
    from rlhf.prompts import add_prompt_file

    with open_db(args) as store:
        added, existing, parsed = add_prompt_file(store, args.file)
    for line in error_summary(parsed.errors):
        say(line)
    print(f"added {added} prompts ({existing} already there, {len(parsed.errors)} bad lines skipped)")
    return 1 if parsed.errors and not parsed.prompts else 0


def cmd_prompts_list(args: argparse.Namespace) -> int:
    with open_db(args) as store:
        for p in store.prompts():
            print(f"{p.id}\t{p.text}")
    return 0
