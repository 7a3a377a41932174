"""`rlhf eval-policy`: a policy version against the reference, judged by a rule
(a known taste) on prompts it never trained on. See rlhf/evaluation.py."""

from __future__ import annotations

import argparse
import json
from typing import Any

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
    p.add_argument("--best-of", type=at_least(2), default=None, metavar="N",
                   help="judge best-of-N of the opponent instead of a trained version: each answer the reward "
                        "model's favourite of N (the baseline a trained policy must beat; its KL is the bound "
                        "log N - (N-1)/N)")
    p.add_argument("--reward", type=at_least(1), default=None,
                   help="with --best-of: the reward version that picks (default: the latest)")
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
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                            seed=args.seed)
    with open_db(args) as store:
        if args.best_of:
            result = _best_of_n(args, store, prompts, rule, params)
        else:
            latest = store.checkpoint("policy", args.version)
            if latest is None:
                raise UserError("no policy version yet: run a PPO session first (`rlhf ppo`)")
            if args.against:
                store.checkpoint("policy", args.against)  # a clear error before the model loads
            stack = load_stack(model_options(args), progress=say)
            role, against_role = load_versions(stack, store, latest.version, args.against)
            result = evaluate(stack, prompts, rule, params, k=args.k, role=role, against_role=against_role,
                              version=latest.version, against=args.against)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return 0
    for ex in result.examples:
        print(f"## {ex['prompt']}\n   {result.name} ({ex['policy_score']:g}): {ex['policy']}\n"
              f"   v{result.against} ({ex['against_score']:g}): {ex['against']}\n")
    print(result.line())
    return 0


def _best_of_n(args: argparse.Namespace, store: Any, prompts: list[str], rule: Any, params: Any) -> Any:
    """Best-of-N of the opponent (the base, or --against) by a reward version, judged by the rule."""
    from rlhf.errors import UserError
    from rlhf.evaluation import evaluate_best_of_n, load_versions
    from rlhf.models import load_stack
    from rlhf.reward_scoring import load_scorer

    if args.version is not None:
        raise UserError("--best-of judges best-of-N of the opponent, not a policy version: leave --version out")
    if store.checkpoint("reward", args.reward) is None:
        raise UserError("no reward model to pick with: train one first (rlhf train-reward)")
    if args.against:
        store.checkpoint("policy", args.against)
    stack = load_stack(model_options(args), progress=say)
    scorer = load_scorer(stack, store, args.reward)
    role = load_versions(stack, store, args.against, 0)[0] if args.against else "base"
    return evaluate_best_of_n(stack, scorer, prompts, rule, params, args.best_of, k=args.k, role=role,
                              against=args.against)
