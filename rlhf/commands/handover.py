"""`rlhf export-policy`: a policy version as a standard peft adapter, or merged
into its base as a plain transformers model, for other tools (rlhf/policy_export.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rlhf.commands.common import at_least, open_db, say


def register(sub: argparse._SubParsersAction) -> None:

    p = sub.add_parser("export-policy", help="write a policy version as a peft adapter, or merged into its base",
                       description="Write policy VERSION to the new folder OUT: the LoRA adapter as peft saves "
                                   "it (PeftModel.from_pretrained loads it), or with --merged the base with the "
                                   "adapter merged in, a transformers model directory that "
                                   "AutoModelForCausalLM.from_pretrained (and vLLM) load. Either comes with a "
                                   "model card naming the base, the labels, the reward and the session settings.")
    p.add_argument("version", type=at_least(1), help="policy version (`rlhf stats` lists them)")
    p.add_argument("out", type=Path, help="a new (or empty) folder")
    p.add_argument("--merged", action="store_true", help="merge the adapter into the base (full precision)")
    p.set_defaults(func=cmd_export_policy)


def cmd_export_policy(args: argparse.Namespace) -> int:
    from rlhf.policy_export import export_policy

    with open_db(args) as store:
        out = export_policy(store, args.version, args.out, merged=args.merged, progress=say)
    what = "merged model" if args.merged else "peft adapter"
    print(f"wrote policy version {args.version} to {out} ({what}, with a model card in README.md)")
    return 0
