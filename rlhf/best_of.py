"""Best-of-N: sample N answers, keep the one the reward model rates highest.

The baseline every trained policy must beat (Stiennon et al. 2020, Gao et al.
2022): no training, and a drift from the sampled policy of at most
log N - (N-1)/N nats (Beirami et al. 2024). The drift view, the labeling queue
and `rlhf eval-policy --best-of N` all pick with ``pick_best``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


# The N the workbench offers beside the trained versions (drift view, labeling queue).
OFFERED = (4, 16)


def best_of_n_kl_bound(n: int) -> float:
    """KL(best-of-n || reference) <= log n - (n-1)/n nats (Beirami et al. 2024;
    the value Stiennon et al. 2020 and Gao et al. 2022 use)."""
    return math.log(n) - (n - 1) / n


def pick_best(scorer: Any, prompt_ids: Sequence[int], pool: Sequence[Any], n: int) -> list[Any]:
    """The top-scored sample of each run of ``n`` in ``pool`` (samples of one
    prompt with ``token_ids``), by ``scorer`` (a RewardScorer): len(pool) / n picks."""
    if n < 1 or len(pool) % n:
        raise ValueError(f"a pool of {len(pool)} samples is not runs of {n}")
    scores = scorer.raw_ids([list(prompt_ids)] * len(pool), [s.token_ids for s in pool]).tolist()
    return [pool[max(range(start, start + n), key=scores.__getitem__)] for start in range(0, len(pool), n)]
