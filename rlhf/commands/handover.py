"""Handing work over to other tools: `rlhf export-policy` (a policy version as a
standard peft adapter, or merged into its base as a plain transformers model,
rlhf/policy_export.py) and `rlhf export-recipe` (the labels and a session's
settings with a TRL script for a cluster, rlhf/recipe_export.py)."""

from __future__ import annotations

import argparse
import json
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

    p = sub.add_parser("export-reward", help="write a reward version as a sequence classifier transformers loads",
                       description="Write reward VERSION to the new folder OUT as a transformers sequence "
                                   "classifier (num_labels 1) that scores as the workbench does: the base with the "
                                   "reward adapter merged in, cut to the layers the reward reads, the heads' mean "
                                   "with the normalization folded in. Load it with "
                                   "AutoModelForSequenceClassification.from_pretrained(OUT, trust_remote_code=True); "
                                   "TRL's RLOO and GRPO take it as reward_funcs.")
    p.add_argument("version", type=at_least(1), help="reward version (`rlhf stats` lists them)")
    p.add_argument("out", type=Path, help="a new (or empty) folder")
    p.set_defaults(func=cmd_export_reward)

    p = sub.add_parser("export-recipe", help="write the labels and a session's settings with a TRL script for a "
                                             "cluster",
                       description="Write to the new folder OUT what continues the experiment with TRL on many "
                                   "GPUs: the labels (TRL preference format), the prompts, the session's settings "
                                   "(recipe.json), train.py (reward model on the labels, then RLOO against it) "
                                   "and an accelerate config, with a README saying how to run them.")
    p.add_argument("out", type=Path, help="a new (or empty) folder")
    p.add_argument("--version", type=at_least(1), help="carry this policy version's session settings (default: "
                                                      "the latest PPO or RLOO version)")
    p.add_argument("--base", help="the base model's hub id or path on the cluster (default: the hub id of the "
                                  "embedded model, else the path the workbench loaded)")
    p.set_defaults(func=cmd_export_recipe)


def cmd_export_policy(args: argparse.Namespace) -> int:
    from rlhf.policy_export import export_policy

    with open_db(args) as store:
        out = export_policy(store, args.version, args.out, merged=args.merged, progress=say)
    what = "merged model" if args.merged else "peft adapter"
    print(f"wrote policy version {args.version} to {out} ({what}, with a model card in README.md)")
    return 0


def cmd_export_reward(args: argparse.Namespace) -> int:
    from rlhf.reward_export import export_reward

    with open_db(args) as store:
        out = export_reward(store, args.version, args.out, progress=say)
    print(f"wrote reward version {args.version} to {out} (a sequence classifier: load it with "
          "trust_remote_code=True, as its README.md says)")
    return 0


def cmd_export_recipe(args: argparse.Namespace) -> int:
    from rlhf.recipe_export import SETTINGS, export_recipe

    with open_db(args) as store:
        out = export_recipe(store, args.out, version=args.version, base=args.base, progress=say)
    settings = json.loads((out / SETTINGS).read_text())
    print(f"wrote the recipe to {out}: {settings['labels']['pairs']} pairs, {settings['base']}; "
          f"run it with `accelerate launch --config_file {out / 'accelerate.yaml'} {out / 'train.py'} reward` "
          "(then `policy`), as its README.md says")
    return 0
