"""`rlhf rollouts`: the kept rollouts of a PPO session, by iteration, sorted by
score, KL or length, and (with --queue) sent to the labeling queue."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from rlhf.commands.common import add_model_options, at_least, model_options, open_db, say
from rlhf.errors import UserError
from rlhf.store import ROLLOUT_SORTS

if TYPE_CHECKING:
    from rlhf.sampling import Sample
    from rlhf.store import Store

# Characters of prompt and completion a listed row shows.
PROMPT_CHARS, COMPLETION_CHARS = 32, 70


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rollouts", help="list a PPO session's kept rollouts, or queue an iteration's for labeling",
                       description="Every PPO iteration's batch is kept. List them (all iterations, or one; "
                                   "in batch order or highest first by score, KL or length), or with --queue put "
                                   "one iteration's in the labeling queue, each prompt's rollout with more "
                                   "completions from the same policy version to make K. "
                                   "`rlhf export --rollouts FILE` writes them all out.")
    p.add_argument("--job", type=at_least(1), default=None, help="the PPO job (default: the latest)")
    p.add_argument("--iteration", type=at_least(1), default=None, help="only this iteration (default: all)")
    p.add_argument("--sort", choices=tuple(ROLLOUT_SORTS), default=None, help="highest first by this")
    p.add_argument("--limit", type=at_least(1), default=20, help="rows to list (default 20)")
    p.add_argument("--queue", action="store_true",
                   help="put --iteration's rollouts in the labeling queue (samples more with the model)")
    p.add_argument("--k", type=at_least(2), default=4, help="completions per queued set (default 4)")
    add_model_options(p)
    p.set_defaults(func=cmd_rollouts)


def cmd_rollouts(args: argparse.Namespace) -> int:
    from rlhf.rollout_archive import ppo_job_id

    with open_db(args) as store:
        job_id = ppo_job_id(store, args.job)
        if args.queue:
            return queue(args, store, job_id)
        kept = store.rollouts(job_id, args.iteration, sort=args.sort)
        rows = kept[:args.limit]
        if not rows:
            raise UserError(f"PPO job {job_id} kept no rollouts" + (
                f" of iteration {args.iteration}" if args.iteration else "") + ": it keeps them as it runs")
        print(f"{'iter':>4} {'ver':>4} {'score':>7} {'kl':>6} {'len':>4} {'end':<6} {'prompt':<{PROMPT_CHARS}} "
              "completion")
        for r in rows:
            version = "-" if r.policy_version is None else str(r.policy_version)
            print(f"{r.iteration:>4} {version:>4} {r.score:>7.3f} {r.kl:>6.2f} {r.n_tokens:>4} {r.finish_reason:<6} "
                  f"{_cut(r.prompt, PROMPT_CHARS):<{PROMPT_CHARS}} {_cut(r.completion, COMPLETION_CHARS)}")
        if len(kept) > len(rows):
            say(f"{len(rows)} of {len(kept)} rollouts shown (--limit)")
    return 0


def queue(args: argparse.Namespace, store: Store, job_id: int) -> int:
    """--queue: the iteration's rollouts into the labeling queue, the model
    loaded only if a prompt needs more completions."""
    from rlhf.models import load_stack
    from rlhf.rollout_archive import queue_rollouts, session_sampling
    from rlhf.sampling import sample_k

    if args.iteration is None:
        raise UserError("--queue needs --iteration N: the iteration whose rollouts to label")
    params = session_sampling(store, job_id)
    stack = None

    def sample_more(prompt: str, version: int, n: int) -> list[Sample]:
        nonlocal stack
        if stack is None:
            stack = load_stack(model_options(args), progress=say)
            if version:
                checkpoint = store.checkpoint("policy", version)
                if checkpoint is None:
                    raise UserError(f"policy version {version} is gone from {store.path}")
                stack.load_policy(checkpoint.path, version)
        return sample_k(stack, [prompt], n, params)[0]

    sets, sampled = queue_rollouts(store, job_id, args.iteration, args.k, sample_more)
    print(f"queued {sets} sets of iteration {args.iteration} of PPO job {job_id} for labeling "
          f"({sampled} completions sampled to make {args.k} each)")
    return 0


def _cut(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"
