"""The whole loop, headless, with a scripted labeler: does the policy learn the taste?

    python benchmarks/loop.py [--rules RULE ...] [--algorithms ppo rloo] [--best-of 4 16]
                              [--prompts 60] [--labels 60] [--iterations N] [--kl-budget NATS] [--seed S] [--quick]

For each rule (a known taste, rlhf.rules), on a fresh database and the embedded
model, exactly as a user would run it with the `rlhf` command line:

1. sample K = 4 completions for each training prompt
   (sample_prompts/default.jsonl): `rlhf sample`;
2. label them by the rule, best of 4 (a tie where all 4 score the same), until
   ``--labels`` comparisons have a preference: `rlhf label --rule RULE --decided N`.
   A tie trains nothing, so where ties leave the budget short, every prompt is
   sampled again (another seed) and labeled on, up to ``--rounds`` times;
3. train a reward model on those labels: `rlhf train-reward --sources label`;
4. run a session against it from the base: `rlhf ppo --wait`, once per
   estimator in ``--algorithms`` (the same labels and reward model for each),
   and `rlhf dpo` on the same labels when ``dpo`` is among them;
   and, with ``--best-of``, best-of-N of the reference by the same reward model
   (the baseline a trained policy must beat);
5. the final policy and the reference answer the held-out prompts
   (sample_prompts/heldout.jsonl, none of them trained on) K times each, and
   every policy answer meets every reference answer by the rule, a tie counting
   half: `rlhf eval-policy --rule RULE`.

Prints the time of each stage, the reward model's held-out accuracy, PPO's score
and KL per iteration, the win-rate with its interval and the KL per rule and
estimator, and as its last line ``loop winrate=<lowest over the rules> kl=<highest>``
for the first estimator listed (the product's default unless told otherwise).
Defaults run two rules that are not about length, each with the product's own
defaults except the PPO iteration count. Sized for two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Tastes that are not about length: the reader addressed as "you", and answers
# with numbers in them. Both vary among the embedded model's answers to one
# prompt, so best-of-4 labels mostly have a unique best.
RULES = (r"more=\b(you|your)\b", r"more=\d")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    sys.path.insert(0, str(ROOT))
    from rlhf.ppo_config import ALGORITHMS, PPOConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rules", nargs="+", default=list(RULES), help="rules to run the loop for")
    p.add_argument("--prompts", type=int, default=60, help="training prompts (default 60)")
    p.add_argument("--labels", type=int, default=60,
                   help="comparisons with a preference to label; ties are labeled too but not counted (default 60)")
    p.add_argument("--rounds", type=int, default=4,
                   help="times to sample every prompt at most, to reach --labels past the ties (default 4)")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--iterations", type=int, default=30, help="PPO iterations at most (default 30)")
    p.add_argument("--kl-budget", type=float, default=10.0, metavar="NATS",
                   help="end each PPO session when a batch's KL passes this, and judge the last version within "
                        "(default 10, the target; 0: no budget)")
    p.add_argument("--algorithms", nargs="+", default=[PPOConfig().algorithm], choices=(*ALGORITHMS, "dpo"),
                   help=f"methods to run on the same labels (ppo and rloo against the same reward model; dpo on "
                        f"the labels directly) (default {PPOConfig().algorithm})")
    p.add_argument("--dpo-args", default="", help="extra `rlhf dpo` options, quoted")
    p.add_argument("--best-of", type=int, nargs="*", default=[], metavar="N",
                   help="also judge best-of-N of the reference by the reward model, for each N (e.g. 4 16)")
    p.add_argument("--eval-prompts", type=int, default=None, help="held-out prompts to judge on (default all)")
    p.add_argument("--reward-args", default="", help="extra `rlhf train-reward` options, quoted")
    p.add_argument("--ppo-args", default="", help="extra `rlhf ppo` options, quoted")
    p.add_argument("--sample-args", default="", help="extra `rlhf sample` and `rlhf eval-policy` options, quoted")
    p.add_argument("--keep", type=Path, default=None, help="keep each rule's database under this folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling, the reward model, the session and the "
                                                      "judging; run again with others to see one run's spread")
    p.add_argument("--quick", action="store_true", help="a smoke run: 8 prompts, 2 iterations, 4 held-out prompts")
    args = p.parse_args(argv)
    if any(n < 2 for n in args.best_of):
        p.error("--best-of: each N must be at least 2")
    if args.quick:
        args.prompts, args.labels, args.iterations, args.eval_prompts = 8, 8, 2, 4
    return args


def rlhf(db: Path, *argv: str) -> str:
    """Run one `rlhf` command as a user would; its output is echoed and returned."""
    cmd = [sys.executable, "-m", "rlhf.cli", "--db", str(db), *argv]
    print("$ rlhf " + " ".join(argv), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out = proc.stdout
    for line in out.splitlines():
        print("  " + line, flush=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"`rlhf {' '.join(argv)}` failed with exit code {proc.returncode}")
    return out


def run_rule(rule: str, args: argparse.Namespace, folder: Path) -> dict:
    from rlhf.prompts import bundled_prompt_file, read_prompt_file
    from rlhf.rows import count_decided
    from rlhf.store import Store

    db = folder / "loop.db"
    train_file = folder / "train_prompts.txt"
    train_file.write_text("\n".join(read_prompt_file(bundled_prompt_file()).prompts[:args.prompts]) + "\n")
    times: dict[str, float] = {}

    def stage(name: str, *argv: str) -> str:
        started = time.monotonic()
        out = rlhf(db, *argv)
        times[name] = times.get(name, 0.0) + time.monotonic() - started
        return out

    stage("set-up", "init", "--no-samples")
    stage("set-up", "prompts", "add", str(train_file))
    seed = ["--seed", str(args.seed)]
    budget = ["--kl-budget", str(args.kl_budget)] if args.kl_budget else []
    decided = 0
    for n in range(args.rounds):
        # Another seed each round, or the same answers would be sampled again.
        stage("sample", "sample", "--k", str(args.k), "--seed", str(args.seed + 1000 * n),
              *(["--all"] if n else []), *shlex.split(args.sample_args))
        stage("label", "label", "--rule", rule, "--k", str(args.k), "--decided", str(args.labels - decided))
        with Store(db) as store:
            kinds = store.stats()["comparisons_by_kind"]
        decided = count_decided(kinds)
        if decided >= args.labels:
            break
    stage("reward", "train-reward", "--sources", "label", *seed, *shlex.split(args.reward_args))
    with Store(db) as store:
        reward, stats = store.checkpoint("reward").meta, store.stats()
    shared = dict(times)
    runs = []
    for algorithm in args.algorithms:
        times.clear()
        times.update(shared)
        if algorithm == "dpo":
            stage("dpo", "dpo", "--policy-version", "0", "--sources", "label", *seed, *shlex.split(args.dpo_args))
        else:
            stage("ppo", "ppo", "--iterations", str(args.iterations), "--wait", "--policy-version", "0",
                  "--algorithm", algorithm, *seed, *budget, *shlex.split(args.ppo_args))
        with Store(db) as store:
            job = store.jobs("dpo" if algorithm == "dpo" else "ppo")[-1]
            latest, series = store.checkpoint("policy"), store.metrics(job.id)
        # A session ended by --kl-budget marks the version that drifted past it: judge its parent.
        version = latest.parent_version if latest.meta.get("over_kl_budget") else latest.version
        limit = ["--limit", str(args.eval_prompts)] if args.eval_prompts else []
        out = stage("eval", "eval-policy", "--rule", rule, "--version", str(version), "--k", str(args.k),
                    "--json", *seed, *limit, *shlex.split(args.sample_args))
        runs.append({"rule": rule, "algorithm": algorithm, "times": dict(times), "reward": reward, "stats": stats,
                     "series": series, "eval": json.loads(out[out.index("{"):]),
                     "past_budget": latest.version if version != latest.version else None})
    for n in args.best_of:
        times.clear()
        times.update(shared)
        limit = ["--limit", str(args.eval_prompts)] if args.eval_prompts else []
        out = stage("eval", "eval-policy", "--rule", rule, "--best-of", str(n), "--k", str(args.k), "--json",
                    *seed, *limit, *shlex.split(args.sample_args))
        runs.append({"rule": rule, "algorithm": f"best-of-{n}", "times": dict(times), "reward": reward,
                     "stats": stats, "series": {}, "eval": json.loads(out[out.index("{"):])})
    return runs


def report(run: dict) -> None:
    from rlhf.stats import rate_text

    rule, reward, ev = run["rule"], run["reward"], run["eval"]
    kinds = run["stats"]["comparisons_by_kind"]
    print(f"\n### rule {rule}, {run['algorithm']}")
    print("stage times: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in run["times"].items())
          + f"; total {sum(run['times'].values()) / 60:.1f} min")
    print(f"labels: {run['stats']['comparisons']} comparisons ({', '.join(f'{n} {k}' for k, n in kinds.items())}), "
          f"{run['stats']['pairs_labeled']} pairs")
    held = rate_text(reward["eval_accuracy"], int(reward["eval_pairs"]), independent=reward.get("eval_elements"))
    print(f"reward model: held-out accuracy {held}; "
          f"{reward['steps']} steps, {reward['epochs']:.1f} epochs; score~length r = "
          f"{reward['length_corr'] if reward['length_corr'] is None else round(reward['length_corr'], 2)}")
    by = {name: dict(points) for name, points in run["series"].items()}
    if "objective/kl" in by and "objective/scores" not in by:  # DPO: the KL measured after each epoch
        print("KL after each epoch: " + ", ".join(f"{v:.2f}" for _, v in sorted(by["objective/kl"].items())))
    if "objective/scores" in by:
        print(f"{'iteration':>9}  {'score':>6}  {'kl':>6}  {'eos':>4}  {'len':>5}  {'s':>5}")
    for step in sorted(by.get("objective/scores", {})):
        print(f"{step:>9}  {by['objective/scores'][step]:6.3f}  {by['objective/kl'][step]:6.2f}  "
              f"{by['val/eos_fraction'][step]:4.2f}  {by['val/completion_tokens'][step]:5.1f}  "
              f"{by.get('time/iteration_s', {}).get(step, float('nan')):5.1f}")
    if run.get("past_budget"):
        print(f"the session's KL passed the budget at v{run['past_budget']}: judged v{ev['version']}, the last within")
    print(f"held-out: win-rate {ev['winrate']:.3f} (95% CI {ev['winrate_low']:.2f}-{ev['winrate_high']:.2f}) over "
          f"{ev['prompts']} prompts x {ev['k']}x{ev['k']} pairs; KL {ev['kl']:.2f} nats/seq"
          f"{' (bound)' if ev.get('best_of') else ''}; mean rule score "
          f"{ev['policy_score']:.2f} (policy) vs {ev['against_score']:.2f} (reference)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = []
    for rule in args.rules:
        with tempfile.TemporaryDirectory(prefix="rlhf-loop-") as tmp:
            folder = args.keep / re.sub(r"\W+", "_", rule) if args.keep else Path(tmp)
            folder.mkdir(parents=True, exist_ok=True)
            for run in run_rule(rule, args, folder):
                runs.append(run)
                report(run)
    print("\n| rule | estimator | comparisons | RM held-out acc | minutes | win-rate | KL |\n"
          "|---|---|---|---|---|---|---|")
    for run in runs:
        ev, reward = run["eval"], run["reward"]
        print(f"| {run['rule']} | {run['algorithm']} | {run['stats']['comparisons']} | "
              f"{reward['eval_accuracy']:.2f} ({reward['eval_pairs']}) | {sum(run['times'].values()) / 60:.1f} | "
              f"{ev['winrate']:.3f} | {ev['kl']:.2f} |")
    first = [r for r in runs if r["algorithm"] == args.algorithms[0]]
    print(f"loop winrate={min(r['eval']['winrate'] for r in first):.3f} "
          f"kl={max(r['eval']['kl'] for r in first):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
