"""The headless command line: everything the workbench does, without a screen.

    rlhf [--db PATH] init | prompts add FILE | prompts list | sample | stats | ...

Errors a user can cause print one line (``rlhf: error: ...``) and exit 2; a
traceback means a bug of ours.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf.cli_options import Parser, add_db_option, add_model_options, add_sampling_options, at_least, model_options
from rlhf.errors import UserError
from rlhf.locations import default_db_path
from rlhf.rules import BUILT_IN
from rlhf.store import Store
from rlhf.text_input import error_summary

if TYPE_CHECKING:
    from rlhf.prompts import PromptFile

Handler = Callable[[argparse.Namespace], int]
# Modules of rlhf/commands/, registered in this order.
COMMAND_MODULES = ("exchange", "reward", "ppo", "drift", "evaluation")


def open_db(args: argparse.Namespace, *, create: bool = False) -> Store:
    """The --db database. Only `init` creates one: elsewhere a mistyped path
    must not quietly become a new, empty database."""
    return Store(args.db, create=create)


def say(msg: str) -> None:
    print(msg, file=sys.stderr)


# --- commands --------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from rlhf.prompts import bundled_prompt_file

    with open_db(args, create=True) as store:
        added = 0
        if args.with_samples and not store.prompts():
            added, _, _ = add_prompt_file(store, bundled_prompt_file())
        print(f"database {store.path} ready (schema {store.schema_version}); {added} sample prompts added")
    return 0


def add_prompt_file(store: Store, path: Path | str) -> tuple[int, int, PromptFile]:
    """Read a prompt file (before touching the store), report its first bad
    lines, add the good prompts. Returns (added, already there, what was read)."""
    from rlhf.prompts import read_prompt_file

    parsed = read_prompt_file(path)
    for line in error_summary(parsed.errors):
        say(line)
    added, existing = store.add_prompts(parsed.prompts, source=str(path), meta=parsed.meta)
    return added, existing, parsed


def cmd_prompts_add(args: argparse.Namespace) -> int:
    with open_db(args) as store:
        added, existing, parsed = add_prompt_file(store, args.file)
    print(f"added {added} prompts ({existing} already there, {len(parsed.errors)} bad lines skipped)")
    return 1 if parsed.errors and not parsed.prompts else 0


def cmd_prompts_list(args: argparse.Namespace) -> int:
    with open_db(args) as store:
        for p in store.prompts():
            print(f"{p.id}\t{p.text}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from rlhf.models import load_stack
    from rlhf.sampling import SamplingParams, sample_k

    with open_db(args) as store:
        ids = store.unlabeled_prompt_ids() if not args.all else [p.id for p in store.prompts()]
        if args.limit is not None:
            ids = ids[:args.limit]
        if not ids:
            raise UserError(f"no prompts to sample in {store.path}: add some with `rlhf prompts add FILE`")
        stack = load_stack(model_options(args), progress=say)
        if args.policy_version:
            checkpoint = store.checkpoint("policy", args.policy_version)
            assert checkpoint is not None
            stack.load_policy(checkpoint["path"], args.policy_version)
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p,
                                max_new_tokens=args.max_new_tokens, seed=args.seed)
        prompts = [store.prompt(i) for i in ids]
        total = 0
        # Groups of prompts per generate call: memory stays bounded, progress shows.
        group = max(1, params.batch_size // args.k)
        for start in range(0, len(prompts), group):
            chunk = prompts[start:start + group]
            for prompt, samples in zip(chunk, sample_k(stack, [p.text for p in chunk], args.k, params)):
                store.add_completions(prompt.id, [s.as_row(params, stack.policy_version) for s in samples])
                total += len(samples)
            say(f"sampled {min(start + group, len(prompts))}/{len(prompts)} prompts")
        print(f"recorded {total} completions for {len(prompts)} prompts (policy version {stack.policy_version})")
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    from rlhf.preferences import label_by_rule
    from rlhf.rules import parse_rule

    rule = parse_rule(args.rule)
    with open_db(args) as store:
        if not store.pending_sets(args.k):
            raise UserError(f"no comparisons waiting for a label in {store.path}: sample some first "
                            "(`rlhf sample --k 4`)")
        kinds = label_by_rule(store, rule, k=args.k, rank=args.rank, limit=args.limit)
        pairs = len(store.pairs(labeler=rule.labeler))
    done = sum(kinds.values())
    parts = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    print(f"labeled {done} comparisons as {rule.labeler} ({parts}); {pairs} pairs by this labeler in all")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from rlhf.jobs import refresh

    with open_db(args) as store:
        refresh(store)  # a killed job is not active, whatever its row last said
        stats = store.stats()
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    width = max(len(k) for k in stats)
    for key, value in stats.items():
        print(f"{key.replace('_', ' '):<{width}}  {value}")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from rlhf.jobs import log_path, refresh

    with open_db(args) as store:
        refresh(store)
        rows = [{"id": j["id"], "kind": j["kind"], "status": j["status"], "step": j["step"],
                 "total_steps": j["total_steps"], "started_at": j["started_at"], "finished_at": j["finished_at"],
                 "error": j["error"], "log": str(log_path(store.path, j["id"]))} for j in store.jobs()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no jobs yet: `rlhf train-reward` and `rlhf ppo` start them")
        return 0
    for job in rows:
        when = " to ".join(s[:19].replace("T", " ") for s in (job["started_at"], job["finished_at"]) if s)
        print(f"job {job['id']}  {job['kind']:<6}  {job['status']:<9}  step {job['step']}/{job['total_steps'] or '?'}"
              f"  {when or 'not started'}")
        if job["error"]:
            print(f"    reason: {job['error']}")
        print(f"    log: {job['log']}")
    return 0


# --- the parser --------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="rlhf", description="RLHF workbench, headless: prompts, sampling, labels, training.")
    add_db_option(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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

    p = sub.add_parser("sample", help="sample K completions for prompts not yet labeled")
    p.add_argument("--k", type=at_least(2), default=4, help="completions per prompt (default 4; at least 2 to compare)")
    p.add_argument("--limit", type=at_least(1), default=None, help="at most this many prompts")
    p.add_argument("--all", action="store_true", help="sample every prompt, labeled or not")
    add_sampling_options(p)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--policy-version", type=at_least(0), default=0, help="policy version to sample from (0 = base)")
    add_model_options(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("label", help="label the comparisons waiting for a label by a rule (a scripted labeler)",
                       description="Label every sampled set of K completions not labeled yet, as a labeler "
                                   "with a known taste would: the best of K (a tie where the top is shared). "
                                   "Labels are recorded by the labeler rule:NAME and train the reward model "
                                   "like your own. Rules: " + ", ".join(BUILT_IN) + ", or module:function "
                                   "(yours: text in, number out); see rlhf/rules.py for what each prefers.")
    p.add_argument("--rule", required=True, help="the taste, e.g. contains=you, more=!, fewer=\\bI\\b, mymod:score")
    p.add_argument("--k", type=at_least(2), default=4, help="completions per comparison, as sampled (default 4)")
    p.add_argument("--rank", action="store_true",
                   help="rank all K where the rule tells them all apart (all C(K,2) pairs), else pick the best")
    p.add_argument("--limit", type=at_least(1), default=None, help="at most this many comparisons")
    p.set_defaults(func=cmd_label)

    p = sub.add_parser("jobs", help="background jobs (reward training, PPO): status, reason for a failure, log")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("stats", help="counts of prompts, labels, pairs and versions")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_stats)

    for register in _later_commands():
        register(sub)
    return parser


def _later_commands() -> list[Callable[[argparse._SubParsersAction], None]]:
    """Command groups in ``rlhf/commands/`` (import/export, reward, PPO, drift):
    each module offers ``register(subparsers)`` and imports the heavy engine
    (torch) only inside its handlers, so ``rlhf --help`` stays fast."""
    import importlib

    found = []
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"rlhf.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"rlhf.commands.{name}":
                raise
            continue
        found.append(module.register)
    return found


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
            remedy = "another process kept it busy for 30 s; try again when it is done"
        else:
            remedy = "check the disk, and the file with `sqlite3 FILE 'PRAGMA integrity_check'`"
        print(f"rlhf: error: the database {args.db} failed ({e}): {remedy}; what was committed before is kept",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlhf: interrupted; everything recorded so far is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
