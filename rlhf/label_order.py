"""Which comparison to label next: as added, at random, or where the reward model
is least sure (active learning).

A solo researcher's labels are the scarcest thing in the loop. The reward model is
a linear head on the base's features (rlhf.reward_config), so how unsure it is of
a set of answers can be worked out before any answer is labeled: under a Gaussian
prior on the head, a label on a set of K answers tells it about their feature
differences (the Fisher information of the Bradley–Terry or best-of-K softmax
likelihood at even odds: the set's features centred, over K), and the posterior
variance of every reward difference in the queue follows. The uncertain order
labels next the set whose label removes the most of that variance summed over the
whole queue, given the sets labeled so far (transductive experimental design, Yu,
Bi & Tresp 2006; the information-based objective of MacKay 1992): a set the model
is unsure of, and one like many others, so that its label tells the model about
those too. Picked greedily, one set after another, as if each were labeled.

Measured with ``benchmarks/active.py`` (HH answer pairs, a scripted labeler, 8
seeds, held-out pairwise accuracy): at 40 labels this order reaches what random
order reaches at 80, 0.781 against 0.780 for "you/your" (random at 40: 0.755) and
0.808 against 0.807 for "more digits" (random at 40: 0.777). On two other tastes it
is ahead at 40 but short of random's 80: "shorter words" 0.694 (random 0.680 at
40, 0.714 at 80), "more question marks" 0.840 (0.824, 0.861). At 80 all are level.
Orders by the trained ensemble (rlhf.reward_ensemble) were measured first and
none beat random order: the entropy of its pick, by turns with random picks,
0.750 against 0.755 at 40 labels; the heads' disagreement (BALD) sought sets
the taste calls a tie, which train nothing; the heads' spread of the margin,
expected gradient length, density weighting, a diverse batch and optimism came
out within ±0.02 of random. Those judge a set by one model fitted to a few labels;
the design judges it by what every label could still teach. It spends more labels
on ties than random order does (41% against 29% for "you/your") and still wins.
It uses the labels' sets, not their verdicts: leaving the ties out of the design
measured no better (0.770 at 40).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal, get_args

from rlhf.chat import chat_prompt_ids
from rlhf.errors import UserError
from rlhf.rows import Completion

if TYPE_CHECKING:  # torch is imported where it is used: the app reads ORDERS without loading it
    import torch

    from rlhf.model_stack import ModelStack
    from rlhf.reward_scoring import RewardScorer
    from rlhf.store import Store

Order = Literal["added", "uncertain", "random"]
ORDERS: tuple[str, ...] = get_args(Order)
Sets = Sequence[tuple[str, Sequence[Completion]]]   # (prompt text, completions) of each set

# The prior's weight, in an average set's information. Held-out accuracy at 40
# labels on benchmarks/active.py's "you/your" pairs: 0.782 at 0.03, 0.776 at 0.1,
# 0.782 at 0.3 (8 seeds); 0.753 at 10 (2 seeds), where the prior drowns the labels.
PRIOR = 0.3
# Sets ordered by the design, at most; the rest follow as given. Each pick costs a
# pass over the queue's kernel, and the app measures again when it comes back.
MAX_PICKS = 200
# The latest labels the design knows of: each costs a pass through the base for
# its answers, and with hundreds labeled the next few change the order little.
MAX_LABELED = 256
# Waiting sets the design ranks, the oldest first; the rest come after, as given.
# The design holds a (sets x K)^2 matrix: 1,000 sets of 4 are 128 MB, and reading
# their answers takes minutes on a CPU.
MAX_WAITING = 1000


def design_order(labeled: Sequence[torch.Tensor], waiting: Sequence[torch.Tensor], *, prior: float = PRIOR,
                 picks: int = MAX_PICKS) -> list[int]:
    """Indices of the ``waiting`` sets, each a [K, features] tensor of its answers'
    reward features, in the order the design labels them given the ``labeled``
    sets: greedily, the set whose label most reduces the summed posterior variance
    of the waiting sets' reward differences."""
    import torch

    if not waiting:
        return []
    sizes = [len(s) for s in waiting]
    rows = torch.cat([*waiting, *labeled]).double()
    mean, std = rows.mean(0), rows.std(0).clamp(min=1e-6)          # a set has two answers or more
    # Each set's information: its standardized features centred and over sqrt(K),
    # so that a pair (a, b) contributes (a - b)(a - b)^T / 4, the Fisher
    # information of one Bradley-Terry label at even odds.
    def informative(s: torch.Tensor) -> torch.Tensor:
        z = (s.double() - mean) / std
        return (z - z.mean(0)) / len(s) ** 0.5

    v = torch.cat([informative(s) for s in waiting])                 # [rows, features]
    # The prior precision: ``prior`` times an average waiting set's information.
    average = (v ** 2).sum() / len(waiting)
    if not torch.isfinite(average) or average == 0:  # no answers that differ (or no numbers): nothing to rank by
        return list(range(len(waiting)))
    precision = prior * average * torch.eye(v.shape[1], dtype=v.dtype)
    if labeled:
        u = torch.cat([informative(s) for s in labeled])
        precision += u.T @ u
    g = v @ torch.linalg.solve(precision, v.T)                       # the rows' posterior covariance
    # Sets as rows of an index, padded with a row of zeros (it adds nothing), so
    # that every set's gain is one batched solve.
    g = torch.nn.functional.pad(g, (0, 1, 0, 1))
    pad = len(v)
    starts = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    index = torch.tensor([list(range(starts[i], starts[i + 1])) + [pad] * (max(sizes) - sizes[i])
                          for i in range(len(waiting))])             # [sets, K]
    eye = torch.eye(index.shape[1], dtype=g.dtype)
    # Labeling set s removes trace((I + G_ss)^-1 (G^2)_ss) of the summed variance:
    # both K x K blocks are kept per set and updated with each pick, a rank-K
    # change, rather than recomputed from the R x R matrices.
    block = g[index[:, :, None], index[:, None, :]]                  # [sets, K, K] of G
    w = g[:, index]
    square = torch.einsum("rsa,rsb->sab", w, w)                      # [sets, K, K] of G^2
    del w
    order: list[int] = []
    taken = torch.zeros(len(waiting), dtype=torch.bool)
    while len(order) < min(picks, len(waiting)):
        gains = torch.linalg.solve(eye + block, square).diagonal(0, 1, 2).sum(1)
        gains[taken] = -1.0
        best = int(gains.argmax())
        order.append(best)
        taken[best] = True
        m = index[best]
        col = g[:, m]                                                # [rows, K]: G's columns of the pick
        inv = torch.linalg.inv(eye + g[m][:, m])
        col2 = g @ col                                               # the same columns of G^2
        # G' = G - col inv col^T, and G'^2 from G^2, col and col2, block by block.
        c, c2 = col[index], col2[index]                              # [sets, K, K]
        ci = c @ inv
        block = block - ci @ c.transpose(1, 2)
        cross = ci @ c2.transpose(1, 2)
        square = (square - cross - cross.transpose(1, 2)
                  + ci @ (col.T @ col) @ ci.transpose(1, 2))
        g.addmm_(col @ inv, col.T, alpha=-1)                          # in place: G is the largest thing here
    return order + [i for i in range(len(waiting)) if not taken[i]]


def set_features(scorer: RewardScorer, sets: Sets) -> list[torch.Tensor]:
    """What the reward head reads of each answer of each (prompt text, completions)
    set: a [K, features] tensor per set, all sets in one batched pass."""
    from rlhf.reward_scoring import batched_features

    tok = scorer.stack.tokenizer
    prompt_ids = {prompt: chat_prompt_ids(tok, prompt) for prompt, _ in sets}
    rows = [prompt_ids[prompt] for prompt, shown in sets for _ in shown]
    ids = [c.token_ids or tok(c.text, add_special_tokens=False)["input_ids"] for _, shown in sets for c in shown]
    if not rows:
        return []
    sequences, lengths = scorer.sequences(rows, ids)
    x = batched_features(scorer.stack, sequences, lengths, scorer.readout, scorer.batch_size)
    return list(x.split([len(shown) for _, shown in sets]))


def design_scorer(stack: ModelStack, store: Store) -> RewardScorer:
    """What reads the answers' features for the design: the latest reward version
    (its read-out, and its adapter where it was fine-tuned), or, before the first,
    ``base_scorer``. The order needs no trained reward model."""
    from rlhf.reward_scoring import load_scorer

    try:
        scorer = load_scorer(stack, store)
    except UserError:  # a version this base cannot load (another model's, say): the order does without
        scorer = None
    return scorer or base_scorer(stack)


def base_scorer(stack: ModelStack) -> RewardScorer:
    """The base's features at the default read-out (the reward adapter fresh: no change)."""
    from rlhf.reward_scoring import ADAPTER, RewardScorer

    stack.ensure_adapter(ADAPTER)
    return RewardScorer(stack)


def labeled_sets(store: Store, limit: int = MAX_LABELED) -> list[tuple[str, list[Completion]]]:
    """(prompt text, completions) of the latest ``limit`` labels (the researcher's
    preference labels; imported pairs are not sets the queue chose)."""
    latest = store.comparisons(purpose="preference")[-limit:]
    return [(store.prompt(c.prompt_id).text, store.completions(c.completion_ids)) for c in latest]


def label_priorities(read: Callable[[Sets], list[torch.Tensor]], waiting: Sets, labeled: Sets = ()) -> list[float]:
    """For each waiting (prompt text, completions) set, how soon the uncertain order
    labels it given the ``labeled`` sets (``design_order``), their features read by
    ``read`` (``set_features`` with a scorer, say): the first gets the highest
    value, sets past ``MAX_PICKS`` (or ``MAX_WAITING``) get 0."""
    ranked = list(waiting[:MAX_WAITING])
    features = read([*ranked, *labeled])
    order = design_order(features[len(ranked):], features[:len(ranked)])
    priority = [0.0] * len(waiting)
    for rank, i in enumerate(order[:MAX_PICKS]):
        priority[i] = float(len(order) - rank)
    return priority


def ordered(items: Sequence[object], order: str, *, priority: Sequence[float] | None = None,
            seed: int = 0) -> list[int]:
    """Indices of ``items`` in the order asked: as given ('added'), shuffled by
    ``seed`` ('random'), or 'uncertain': highest ``priority`` first
    (``label_priorities``), ties as given."""
    if order not in ORDERS:
        raise UserError(f"unknown order {order!r}: use one of {', '.join(ORDERS)}")
    index = list(range(len(items)))
    if order == "added":
        return index
    if order == "random":
        random.Random(seed).shuffle(index)
        return index
    if priority is None:
        raise UserError("ordering by uncertainty needs the model's features: load a model first")
    return sorted(index, key=lambda i: -priority[i])
