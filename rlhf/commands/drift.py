"""`rlhf drift winrate` (human win-rate of each policy version over the reference,
beside its reward) and `rlhf drift show` (probe answers with their KL)."""

from __future__ import annotations

import argparse
import json

from rlhf.commands.common import add_model_options, at_least, model_options, open_db, positive, say


def register(sub: argparse._SubParsersAction) -> None:

    drift = sub.add_parser("drift", help="how far policy versions drifted from the reference").add_subparsers(
        dest="drift_command", required=True, metavar="ACTION")
    p = drift.add_parser("winrate", help="human win-rate of each policy version over the reference "
                                         "(blind drift labels; a tie counts half) beside its reward")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_winrate)

    p = drift.add_parser("show", help="the reference and a policy version answer the probe prompts; "
                                      "prints each answer's sequence KL")
    p.add_argument("--version", type=at_least(1), required=True, help="policy version (1, 2, ...)")
    p.add_argument("--limit", type=at_least(1), default=None, help="at most this many probe prompts")
    p.add_argument("--max-new-tokens", type=at_least(1), default=48)
    p.add_argument("--temperature", type=positive, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    add_model_options(p)
    p.set_defaults(func=cmd_show)


def cmd_winrate(args: argparse.Namespace) -> int:
    from rlhf.drift import drift_table, over_optimization

    with open_db(args) as store:
        rows = drift_table(store)
    warnings = over_optimization(rows)
    if args.json:
        print(json.dumps({"versions": [r.as_dict() for r in rows], "warnings": warnings,
                          "ties": "count half a win"}, indent=2))
        return 0
    print(f"{'contender':>24}  {'method':>9}  {'reward':>7}  {'kl':>6}  {'wins':>4}  {'losses':>6}  {'ties':>4}  "
          f"{'win-rate':>8}  95% CI")
    for r in rows:
        reward = f"{r.reward:7.3f}" if r.reward is not None else f"{'-':>7}"
        kl = f"{r.kl:6.2f}" if r.kl is not None else f"{'-':>6}"
        rate = f"{r.win_rate:8.0%}" if r.win_rate is not None else f"{'-':>8}"
        interval = r.interval()
        bounds = f"{interval[0]:.2f}-{interval[1]:.2f}" if interval else "-"
        name = "reference v0" if r.is_reference else r.name
        print(f"{name:>24}  {r.method or '-':>9}  {reward}  {kl}  {r.wins:>4}  {r.losses:>6}  {r.ties:>4}  {rate}  "
              f"{bounds}")
    print("win-rate = (wins + ties/2) / labels, from blind contender-vs-reference labels; reward = mean score of "
          "the PPO rollouts sampled from that version; kl = nats per answer (rollouts sampled from the version, "
          "else what its job measured; best-of-N: the bound)")
    for w in warnings:
        print(f"WARNING: {w}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    import torch

    from rlhf.drift import answer_pair, load_drift_version, probe_prompts
    from rlhf.models import load_stack
    from rlhf.sampling import SamplingParams

    with open_db(args) as store:
        store.checkpoint("policy", args.version)  # a clear error before the model loads
        stack = load_stack(model_options(args), progress=say)
        load_drift_version(stack, store, args.version)
    params = SamplingParams(temperature=args.temperature, top_p=1.0, max_new_tokens=args.max_new_tokens)
    torch.manual_seed(args.seed)
    prompts = probe_prompts()[:args.limit] if args.limit else probe_prompts()
    for prompt in prompts:
        pair = answer_pair(stack, prompt, params)
        print(f"## {prompt}\n   KL(policy v{args.version} || ref) ≈ {pair.kl:.2f} nats")
        print(f"   reference: {pair.reference.text}")
        print(f"   policy:    {pair.policy.text}\n")
    return 0
