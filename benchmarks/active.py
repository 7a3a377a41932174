"""Labels chosen where the reward model is unsure against labels chosen at random.

    python benchmarks/active.py [--rules RULE ...] [--pool 400] [--test 200]
                                [--seeds 3] [--sizes 10 20 40 80] [--batch 5] [--quick]

A scripted labeler with a known taste (rlhf.rules) labels answer pairs from
../shared/data/hh-harmless-sample.jsonl (the two assistant replies of each row,
as a set of K = 2 to pick from; equal by the rule is a tie, a label that gives no
pair). Both strategies start from the same --batch labels at random (a
researcher who labeled a few as added before choosing the order); then

- random: the next labels in a random order;
- uncertain: the product's uncertain order given those labels
  (rlhf.label_order.design_order: next, the pair whose label would remove the most
  of the reward model's uncertainty over the whole pool). It reads the answers'
  features, not the labels, so it is drawn once.

At each size N the reward model (the product's default: an ensemble of heads on
the embedded model's frozen features, rlhf.reward_ensemble) is trained on the N
labels and judged on --test held-out pairs (their prompts are in no pool pair)
that the rule tells apart: pairwise accuracy. The features are computed once, so
the whole run is head training. Prints a table (mean and spread over seeds) and,
as its last line, ``active acc_at_40=<uncertain> random_at_40=<random>``
(the first rule). Target: uncertain at 40 labels as good as random at 80.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hh-harmless-sample.jsonl"
RULES = (r"more=\b(you|your)\b", r"more=\d")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rules", nargs="+", default=list(RULES), help="the labeler's tastes (rlhf.rules)")
    p.add_argument("--pool", type=int, default=400, help="answer pairs the labels are chosen from")
    # 800 held-out pairs and 8 seeds: with 200 and 3, one seed's spread (0.03-0.05) hid
    # the differences between orders (a few hundredths)
    p.add_argument("--test", type=int, default=800, help="held-out answer pairs the reward model is judged on")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 20, 40, 80], help="label counts to judge at")
    p.add_argument("--batch", type=int, default=5, help="labels at random before either order")
    p.add_argument("--max-length", type=int, default=320, help="tokens per sequence (a long prompt loses its start)")
    p.add_argument("--quick", action="store_true", help="a smoke run: small pool, one seed, sizes 10 and 20")
    args = p.parse_args(argv)
    if args.quick:
        args.pool, args.test, args.seeds, args.sizes, args.rules = 60, 40, 1, [10, 20], args.rules[:1]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    from rlhf.chat import chat_prompt_ids
    from rlhf.exchange_import import read_preference_file
    from rlhf.label_order import design_order
    from rlhf.models import load_stack
    from rlhf.reward_config import RewardConfig
    from rlhf.reward_data import Element, completion_tokens, join_prompt
    from rlhf.reward_ensemble import bootstrap_counts, fit_heads
    from rlhf.reward_loss import Comparisons
    from rlhf.reward_scoring import ADAPTER, batched_features
    from rlhf.rules import parse_rule

    started = time.monotonic()
    pairs, _ = read_preference_file(DATA)
    by_prompt: dict[str, list] = {}
    for pair in pairs:
        by_prompt.setdefault(pair.prompt, []).append(pair)
    prompts = sorted(by_prompt)
    random.Random(0).shuffle(prompts)
    pool, test = [], []
    for prompt in prompts:  # whole prompts to one side, so no test prompt is in the pool
        side = pool if len(pool) < args.pool else test
        side.extend(by_prompt[prompt])
        if len(test) >= args.test:
            break
    pool, test = pool[:args.pool], test[:args.test]

    stack = load_stack()
    stack.ensure_adapter(ADAPTER)
    config = RewardConfig()
    readout = config.readout_for(stack)
    tok = stack.tokenizer

    def encode(items: list) -> tuple[list[list[int]], list[int]]:
        seqs, lengths = [], []
        for pair in items:
            prompt_ids = chat_prompt_ids(tok, pair.prompt)
            for text in (pair.chosen, pair.rejected):
                body = completion_tokens(tok, text, None, max_tokens=args.max_length // 2)
                seqs.append(join_prompt(prompt_ids, body, args.max_length))
                lengths.append(len(body))
        return seqs, lengths

    pool_seqs, pool_lengths = encode(pool)
    test_seqs, test_lengths = encode(test)
    x_pool = batched_features(stack, pool_seqs, pool_lengths, readout, 16)
    x_test = batched_features(stack, test_seqs, test_lengths, readout, 16)
    # The rest is thousands of small tensor operations: one thread does them
    # fastest, and does not fight a job running beside it for the cores.
    torch.set_num_threads(1)
    print(f"features of {len(pool)} pool and {len(test)} test answer pairs (embedded model, layer "
          f"{readout.layer}, {readout.pool}): {time.monotonic() - started:.0f} s", flush=True)

    def fit(chosen: list[int], elements: list, seed: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The default reward model on the labeled sets (ties give no pair): raw weight and bias."""
        labeled = [elements[i] for i in chosen if elements[i].pairs]
        if not labeled:
            return None
        rows = torch.tensor([2 * i + j for i in chosen if elements[i].pairs for j in (0, 1)])
        counts = bootstrap_counts(labeled, config.ensemble, seed)
        weight, bias, _ = fit_heads(x_pool[rows], Comparisons(labeled), counts, config)
        return weight, bias

    sets = list(x_pool.split(2))  # each pool pair's answers: what the design order reads
    results: dict[tuple[str, str, int], list[float]] = {}
    tie_share: dict[tuple[str, str], list[float]] = {}
    for spec in args.rules:
        rule = parse_rule(spec)
        pool_scores = [(rule(p.chosen), rule(p.rejected)) for p in pool]
        elements = [Element(p.prompt, [pool_seqs[2 * i], pool_seqs[2 * i + 1]],
                            [] if a == b else [(0, 1)] if a > b else [(1, 0)], kind="pair",
                            lengths=[pool_lengths[2 * i], pool_lengths[2 * i + 1]])
                    for i, (p, (a, b)) in enumerate(zip(pool, pool_scores))]
        test_scores = [(rule(p.chosen), rule(p.rejected)) for p in test]
        decided = [i for i, (a, b) in enumerate(test_scores) if a != b]
        sign = torch.tensor([1.0 if test_scores[i][0] > test_scores[i][1] else -1.0 for i in decided])
        print(f"\n### rule {spec}: {sum(bool(e.pairs) for e in elements)} of {len(pool)} pool sets and "
              f"{len(decided)} of {len(test)} test pairs are not ties", flush=True)

        def accuracy(model: tuple[torch.Tensor, torch.Tensor] | None) -> float:
            if model is None:
                return 0.5
            rewards = (x_test @ model[0] + model[1]).mean(1)
            margins = rewards[[2 * i for i in decided]] - rewards[[2 * i + 1 for i in decided]]
            return ((margins * sign) > 0).float().mean().item()

        for seed in range(args.seeds):
            order = list(range(len(pool)))
            random.Random(seed).shuffle(order)
            for size in args.sizes:
                results.setdefault((spec, "random", size), []).append(accuracy(fit(order[:size], elements, seed)))
            start, rest = order[:args.batch], order[args.batch:]
            chosen = start + [rest[j] for j in design_order([sets[i] for i in start], [sets[i] for i in rest],
                                                            picks=max(args.sizes))]
            for size in args.sizes:
                results.setdefault((spec, "uncertain", size), []).append(accuracy(fit(chosen[:size], elements, seed)))
            # A tie trains nothing: how many of each order's labels were spent on one.
            for strategy, picked in (("random", order), ("uncertain", chosen)):
                picked = picked[args.batch:max(args.sizes)]
                tie_share.setdefault((spec, strategy), []).append(
                    sum(not elements[i].pairs for i in picked) / len(picked))
            print(f"seed {seed}: random " + " ".join(f"{results[(spec, 'random', n)][-1]:.3f}" for n in args.sizes)
                  + " | uncertain " + " ".join(f"{results[(spec, 'uncertain', n)][-1]:.3f}" for n in args.sizes),
                  flush=True)

    print(f"\nheld-out pairwise accuracy, mean (sd) over {args.seeds} seeds; {time.monotonic() - started:.0f} s "
          "in all\n")
    print("| rule | order | " + " | ".join(f"N={n}" for n in args.sizes) + " | ties chosen |")
    print("|---|---|" + "---|" * (len(args.sizes) + 1))
    for spec in args.rules:
        for strategy in ("random", "uncertain"):
            cells = []
            for n in args.sizes:
                values = results[(spec, strategy, n)]
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.fmean(values):.3f} ({sd:.3f})")
            print(f"| {spec} | {strategy} | " + " | ".join(cells)
                  + f" | {statistics.fmean(tie_share[(spec, strategy)]):.2f} |")
    first, at = args.rules[0], 40 if 40 in args.sizes else args.sizes[-1]
    print(f"active acc_at_{at}={statistics.fmean(results[(first, 'uncertain', at)]):.3f} "
          f"random_at_{at}={statistics.fmean(results[(first, 'random', at)]):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
