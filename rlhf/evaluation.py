"""A policy against its reference, judged by a rule on prompts it never trained on.

The "gold reward" check of Gao et al. 2022 (arXiv 2210.10760), with a rule as
the gold judge: a scripted labeler (rlhf.rules) labeled the training
comparisons, the reward model learned from them, PPO optimized the reward
model; here the final policy and the reference each answer held-out prompts K
times, and every policy answer meets every reference answer of the same prompt
(K x K pairs, a tie counting half). The win-rate says whether the labels'
taste reached the policy; the KL says what it cost:

    KL(pi || pi_ref) per sequence = E_{a ~ pi} [ sum_t log pi(a_t) - log pi_ref(a_t) ],

estimated on the policy's own answers, both log-probs teacher-forced at the
sampling temperature (the k1 estimator PPO reports as objective/kl).

Best-of-N is judged the same way: the baseline every trained policy must beat
(Gao et al. 2022; Beirami et al. 2024, arXiv 2401.01879). Each of its answers is
the reward model's favourite of N samples of the reference; its KL is the bound
log N - (N-1)/N, as its likelihood has no token-by-token form to measure.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rlhf.best_of import best_of_n_kl_bound, pick_best
from rlhf.chat import chat_prompt_ids
from rlhf.rules import Rule, pairwise_winrate
from rlhf.sampling import SamplingParams, sample_k
from rlhf.tokens import teacher_forced_logprobs

CANDIDATE = "judged"          # the adapter the judged version is loaded as ("eval" is taken: nn.Module.eval)
BASELINE = "judged_against"  # and its opponent, unless that is the base (version 0)


@dataclass
class PolicyEval:
    """How a policy version fared against another (0 = the base) on some prompts."""

    rule: str
    version: int
    against: int
    k: int
    winrates: list[float]            # per prompt, over its K x K pairs
    kl: float                        # nats per sequence, mean over the policy's answers
    policy_score: float              # mean rule score of the policy's answers
    against_score: float             # and of the opponent's
    examples: list[dict[str, Any]] = field(default_factory=list)
    best_of: int | None = None       # best-of-N from the opponent by a reward model, not a trained version
    reward: int | None = None        # ... and that reward model's version

    @property
    def name(self) -> str:
        return f"best-of-{self.best_of} (reward v{self.reward})" if self.best_of else f"v{self.version}"

    @property
    def winrate(self) -> float:
        return statistics.fmean(self.winrates)

    @property
    def interval(self) -> tuple[float, float]:
        """95% interval over prompts (pairs of one prompt are not independent)."""
        if len(self.winrates) < 2:
            return (0.0, 1.0)
        half = 1.96 * statistics.stdev(self.winrates) / math.sqrt(len(self.winrates))
        return (max(0.0, self.winrate - half), min(1.0, self.winrate + half))

    def line(self) -> str:
        low, high = self.interval
        kl = f"KL {self.kl:.2f} nats/seq" + (" (the best-of-N bound)" if self.best_of else "")
        return (f"{self.name} vs v{self.against} by rule:{self.rule}: win-rate {self.winrate:.3f} "
                f"(95% CI {low:.2f}-{high:.2f}) on {len(self.winrates)} prompts x {self.k}x{self.k} pairs; "
                f"{kl}; mean rule score {self.policy_score:.3f} vs {self.against_score:.3f}")

    def as_dict(self) -> dict[str, Any]:
        low, high = self.interval
        return {"rule": self.rule, "version": self.version, "against": self.against, "k": self.k,
                "prompts": len(self.winrates), "winrate": self.winrate, "winrate_low": low, "winrate_high": high,
                "kl": self.kl, "policy_score": self.policy_score, "against_score": self.against_score,
                "best_of": self.best_of, "reward": self.reward}


def load_versions(stack: Any, store: Any, version: int, against: int = 0) -> tuple[str, str]:
    """Load the judged version and its opponent as adapters of their own (the
    stack's policy and reference stay as they are). Returns their roles."""
    from rlhf.drift import REFERENCE_VERSION

    checkpoint = store.checkpoint("policy", version)
    assert checkpoint is not None
    stack.load_adapter(CANDIDATE, checkpoint.path, heads=False)
    if against == REFERENCE_VERSION:
        return CANDIDATE, "base"
    other = store.checkpoint("policy", against)
    assert other is not None
    stack.load_adapter(BASELINE, other.path, heads=False)
    return CANDIDATE, BASELINE


@torch.no_grad()
def evaluate(stack: Any, prompts: Sequence[str], rule: Rule, params: SamplingParams, *, k: int = 4,
             role: str = CANDIDATE, against_role: str = "base", version: int = 0, against: int = 0,
             examples: int = 3) -> PolicyEval:
    """Sample K answers per prompt from both roles, judge all K x K pairs by the
    rule, and estimate the sequence KL of ``role`` from ``against_role``."""
    if params.seed is not None:
        torch.manual_seed(params.seed)
    ours = sample_k(stack, prompts, k, params, role=role)
    theirs = sample_k(stack, prompts, k, params, role=against_role)
    kls = [kl for prompt, mine in zip(prompts, ours)
           for kl in sequence_kls(stack, prompt, mine, role, against_role, params.temperature)]
    return _judged(prompts, ours, theirs, rule, k=k, version=version, against=against, kl=statistics.fmean(kls),
                   examples=examples)


def sequence_kls(stack: Any, prompt: str, samples: Sequence[Any], role: str, against_role: str,
                 temperature: float) -> list[float]:
    """log pi(a) - log pi_ref(a) of each sampled answer a of ``role`` (its KL
    estimate, in nats per sequence), both teacher-forced at the sampling temperature."""
    prompt_ids = chat_prompt_ids(stack.tokenizer, prompt)
    rows = [s.token_ids or [stack.tokenizer.eos_token_id] for s in samples]
    under_policy = teacher_forced_logprobs(stack, role, prompt_ids, rows, temperature)
    under_ref = teacher_forced_logprobs(stack, against_role, prompt_ids, rows, temperature)
    return [sum(p) - sum(r) for p, r in zip(under_policy, under_ref)]


@torch.no_grad()
def evaluate_best_of_n(stack: Any, scorer: Any, prompts: Sequence[str], rule: Rule, params: SamplingParams,
                       n: int, *, k: int = 4, role: str = "base", against: int = 0,
                       examples: int = 3) -> PolicyEval:
    """Best-of-``n`` of ``role`` (the reference) by the reward model ``scorer``
    against ``role`` itself: each of its K answers per prompt is the top-scored
    of n fresh samples; judged by the rule like a trained version."""
    if params.seed is not None:
        torch.manual_seed(params.seed)
    pools = sample_k(stack, prompts, k * n, params, role=role)
    theirs = sample_k(stack, prompts, k, params, role=role)
    ours = [pick_best(scorer, chat_prompt_ids(stack.tokenizer, prompt), pool, n)
            for prompt, pool in zip(prompts, pools)]
    result = _judged(prompts, ours, theirs, rule, k=k, version=0, against=against, kl=best_of_n_kl_bound(n),
                     examples=examples)
    result.best_of, result.reward = n, getattr(scorer, "version", None)
    return result


def _judged(prompts: Sequence[str], ours: Sequence[Sequence[Any]], theirs: Sequence[Sequence[Any]], rule: Rule,
            *, k: int, version: int, against: int, kl: float, examples: int) -> PolicyEval:
    """Every answer of ours meets every answer of theirs to the same prompt, by the rule."""
    winrates, our_scores, their_scores, shown = [], [], [], []
    for prompt, mine, other in zip(prompts, ours, theirs):
        a = [rule(s.text, s.token_ids, s.finish_reason == "eos") for s in mine]
        b = [rule(s.text, s.token_ids, s.finish_reason == "eos") for s in other]
        winrates.append(pairwise_winrate(a, b))
        our_scores += a
        their_scores += b
        if len(shown) < examples:
            shown.append({"prompt": prompt, "policy": mine[0].text, "against": other[0].text,
                          "policy_score": a[0], "against_score": b[0]})
    return PolicyEval(rule=rule.name, version=version, against=against, k=k, winrates=winrates, kl=kl,
                      policy_score=statistics.fmean(our_scores), against_score=statistics.fmean(their_scores),
                      examples=shown)
