"""`rlhf sample` (K completions per prompt, into the store) and `rlhf label` (a
scripted labeler labels what is waiting, by a rule)."""

from __future__ import annotations

import argparse

from rlhf.commands.common import add_model_options, add_sampling_options, at_least, model_options, open_db, say
from rlhf.errors import UserError
from rlhf.label_order import ORDERS
from rlhf.rules import BUILT_IN


def register(sub: argparse._SubParsersAction) -> None:
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
                                   "with a known taste would: the best of K (every one that shares the top; "
                                   "a tie where all K are equal). "
                                   "Labels are recorded by the labeler rule:NAME and train the reward model "
                                   "like your own. Rules: " + ", ".join(BUILT_IN) + ", or module:function "
                                   "(yours: text in, number out); see rlhf/rules.py for what each prefers.")
    p.add_argument("--rule", required=True, help="the taste, e.g. contains=you, more=!, fewer=\\bI\\b, mymod:score")
    p.add_argument("--k", type=at_least(2), default=4, help="completions per comparison, as sampled (default 4)")
    p.add_argument("--rank", action="store_true",
                   help="rank all K where the rule tells them all apart (all C(K,2) pairs), else pick the best")
    limit = p.add_mutually_exclusive_group()
    limit.add_argument("--limit", type=at_least(1), default=None, help="at most this many comparisons")
    limit.add_argument("--decided", type=at_least(1), default=None, metavar="N",
                       help="label until N comparisons have a preference (a best or a ranking); the ties met on "
                            "the way are recorded but not counted, since a tie trains nothing")
    p.add_argument("--order", choices=ORDERS, default="added",
                   help="which to label first, with --limit or --decided: as added (default), random, or uncertain "
                        "(the sets whose labels would tell the reward model most: rlhf/label_order.py)")
    p.add_argument("--seed", type=int, default=0, help="the shuffle of --order random")
    add_model_options(p)
    p.set_defaults(func=cmd_label)


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
            stack.load_policy(checkpoint.path, args.policy_version)
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
    from rlhf.rows import count_decided
    from rlhf.rules import parse_rule

    rule = parse_rule(args.rule)
    with open_db(args) as store:
        if not store.pending_sets(args.k):
            raise UserError(f"no comparisons waiting for a label in {store.path}: sample some first "
                            "(`rlhf sample --k 4`)")
        scorer = None
        if args.order == "uncertain":
            from rlhf.label_order import design_scorer
            from rlhf.models import load_stack

            scorer = design_scorer(load_stack(model_options(args), progress=say), store)
        kinds = label_by_rule(store, rule, k=args.k, rank=args.rank, limit=args.limit, decided=args.decided,
                              order=args.order, scorer=scorer, seed=args.seed)
        pairs = len(store.pairs(labeler=rule.labeler))
    done = sum(kinds.values())
    parts = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    print(f"labeled {done} comparisons as {rule.labeler} ({parts}); {pairs} pairs by this labeler in all")
    decided = count_decided(kinds)
    if args.decided is not None and decided < args.decided:
        say(f"only {decided} of the {args.decided} asked for have a preference, and nothing is left to label: "
            f"sample the prompts again (`rlhf sample --all --seed S`) and label on")
    return 0
