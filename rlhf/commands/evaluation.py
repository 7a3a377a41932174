"""`rlhf eval-policy`: a policy version against the reference, judged by a rule
(a known taste) on prompts it never trained on. See rlhf/evaluation.py."""

from __future__ import annotations

import argparse
import json

from rlhf.commands.common import add_model_options, add_sampling_options, at_least, model_options, open_db, say


def register(sub: argparse._SubParsersAction) -> None:

    p = sub.add_parser("eval-policy", help="win-rate of a policy version over the reference by a rule, "
                                           "on held-out prompts, with its KL",
                       description="Both the policy version and the reference answer each prompt K times; "
                                   "every policy answer meets every reference answer by the rule (a tie counts "
                                   "half). Use the rule your scripted labels were made with: the win-rate says "
                                   "whether that taste reached the policy.")
    p.add_argument("--rule", required=True, help="the judge, e.g. contains=you (see `rlhf label --help`)")
    p.add_argument("--version", type=at_least(1), default=None, help="policy version (default: the latest)")
    p.add_argument("--against", type=at_least(0), default=0, help="the opponent version (default 0, the base)")
    p.add_argument("--prompts", default=None,
                   help="prompt file (default: sample_prompts/heldout.jsonl, prompts no sample set shares)")
    p.add_argument("--limit", type=at_least(1), default=None, help="at most this many prompts")
    p.add_argument("--k", type=at_least(1), default=4, help="answers per prompt and side (default 4)")
    add_sampling_options(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_model_options(p)
    p.set_defaults(func=cmd_eval_policy)


def cmd_eval_policy(args: argparse.Namespace) -> int:
    from rlhf.errors import UserError
    from rlhf.evaluation import evaluate, load_versions
    from rlhf.models import load_stack
    from rlhf.prompts import bundled_prompt_file, read_prompt_file
    from rlhf.rules import parse_rule
    from rlhf.sampling import SamplingParams

    rule = parse_rule(args.rule)
    source = args.prompts or bundled_prompt_file("heldout.jsonl")
    prompts = read_prompt_file(source).prompts[:args.limit]
    if not prompts:
        limited = "" if args.limit is None else f" with --limit {args.limit}"
        raise UserError(f"no prompts to judge on in {source}{limited}: pass a .txt (one a line) or .jsonl file "
                        "with --prompts, and a --limit of at least 1")
    with open_db(args) as store:
        latest = store.checkpoint("policy", args.version)
        if latest is None:
            raise UserError("no policy version yet: run a PPO session first (`rlhf ppo`)")
        if args.against:
            store.checkpoint("policy", args.against)  # a clear error before the model loads
        stack = load_stack(model_options(args), progress=say)
        role, against_role = load_versions(stack, store, latest.version, args.against)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                            seed=args.seed)
    result = evaluate(stack, prompts, rule, params, k=args.k, role=role, against_role=against_role,
                      version=latest.version, against=args.against)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return 0
    for ex in result.examples:
        print(f"## {ex['prompt']}\n   v{result.version} ({ex['policy_score']:g}): {ex['policy']}\n"
              f"   v{result.against} ({ex['against_score']:g}): {ex['against']}\n")
    print(result.line())
    return 0
