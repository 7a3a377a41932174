"""The headless command line: everything the workbench does, without a screen.

    rlhf [--db PATH] init | prompts add FILE | prompts list | sample | stats | ...

Errors a user can cause print one line (``rlhf: error: ...``) and exit 2; a
traceback means a bug of ours.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from rlhf.errors import UserError
from rlhf.locations import DEFAULT_DB_NAME, default_db_path
from rlhf.rules import BUILT_IN
from rlhf.store import Store

Handler = Callable[[argparse.Namespace], int]
# Modules of rlhf/commands/, registered in this order.
COMMAND_MODULES = ("exchange", "reward", "ppo", "drift", "evaluation")


# --- shared option groups ----------------------------------------------------------


def add_db_option(parser: argparse.ArgumentParser, note: str = "") -> None:
    """--db, the same for the CLI and the workbench."""
    parser.add_argument(
        "--db", type=Path, default=None,
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
            ("--temperature", float, base.temperature, "sampling temperature"),
            ("--top-p", float, base.top_p, "nucleus sampling mass (1.0 = the full distribution)"),
            ("--max-new-tokens", int, base.max_new_tokens, "length budget in tokens")):
        note = f"default {value}" if defaults else f"default: as the reward model's labels were sampled, else {value}"
        parser.add_argument(flag, type=kind, default=value if defaults else None, help=f"{about} ({note})")


def model_options(args: argparse.Namespace):  # -> ModelOptions, imported lazily (torch is slow to import)
    from rlhf.models import ModelOptions

    return ModelOptions(source=args.model, quantize=args.quantize, device=args.device)


def open_db(args: argparse.Namespace) -> Store:
    return Store(args.db)


def say(msg: str) -> None:
    print(msg, file=sys.stderr)


# --- commands --------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from rlhf.prompts import bundled_prompt_file

    with open_db(args) as store:
        added = 0
        if args.with_samples and not store.prompts():
            added = _add_prompt_file(store, bundled_prompt_file())
        print(f"database {store.path} ready (schema {store.schema_version}); {added} sample prompts added")
    return 0


def _add_prompt_file(store: Store, path: Path | str) -> int:
    from rlhf.prompts import read_prompt_file

    parsed = read_prompt_file(path)
    for error in parsed.errors:
        say(f"skipped {error}")
    added, existing = store.add_prompts(parsed.prompts, source=str(path), meta=parsed.meta)
    if existing:
        say(f"{existing} prompts were already in the database")
    return added


def cmd_prompts_add(args: argparse.Namespace) -> int:
    from rlhf.prompts import read_prompt_file

    with open_db(args) as store:
        parsed = read_prompt_file(args.file)
        for error in parsed.errors:
            say(f"skipped {error}")
        added, existing = store.add_prompts(parsed.prompts, source=str(args.file), meta=parsed.meta)
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
    with open_db(args) as store:
        stats = store.stats()
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    width = max(len(k) for k in stats)
    for key, value in stats.items():
        print(f"{key.replace('_', ' '):<{width}}  {value}")
    return 0


# --- the parser --------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    p.add_argument("--k", type=int, default=4, help="completions per prompt (default 4)")
    p.add_argument("--limit", type=int, default=None, help="at most this many prompts")
    p.add_argument("--all", action="store_true", help="sample every prompt, labeled or not")
    add_sampling_options(p)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--policy-version", type=int, default=0, help="policy version to sample from (0 = base)")
    add_model_options(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("label", help="label the comparisons waiting for a label by a rule (a scripted labeler)",
                       description="Label every sampled set of K completions not labeled yet, as a labeler "
                                   "with a known taste would: the best of K (a tie where the top is shared). "
                                   "Labels are recorded by the labeler rule:NAME and train the reward model "
                                   "like your own. Rules: " + ", ".join(BUILT_IN) + ", or module:function "
                                   "(yours: text in, number out); see rlhf/rules.py for what each prefers.")
    p.add_argument("--rule", required=True, help="the taste, e.g. contains=you, more=!, fewer=\\bI\\b, mymod:score")
    p.add_argument("--k", type=int, default=4, help="completions per comparison, as sampled (default 4)")
    p.add_argument("--rank", action="store_true",
                   help="rank all K where the rule tells them all apart (all C(K,2) pairs), else pick the best")
    p.add_argument("--limit", type=int, default=None, help="at most this many comparisons")
    p.set_defaults(func=cmd_label)

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
    except KeyboardInterrupt:
        print("rlhf: interrupted; everything recorded so far is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
