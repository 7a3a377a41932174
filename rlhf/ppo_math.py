"""The formulas of KL-regularized PPO, one function each (after TRL's PPO trainer
and OpenAI's lm-human-preferences), so each can be read and tested alone.

Shapes: ``[batch, T]`` over completion tokens; ``mask`` is 1 on real tokens
(EOS included) and 0 on the padding after a completion ended.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.ppo_config import MISSING_EOS_MODES


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-position entropy of the (temperature-scaled) next-token distribution."""
    logits = logits.float() / temperature
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(dim) / mask.sum(dim)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the masked entries (Bessel-corrected like TRL's)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            raise ValueError("masked_var needs at least two unmasked values")
        var = var * n / (n - 1)
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries; padding becomes 0. Advantages are
    whitened per batch (lm-human-preferences, TRL)."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def shaped_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                   mask: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token reward -beta*(log pi - log pi_ref) at every completion token, plus
    the sequence score at its last token (the EOS, where the reward model read it).
    Returns (rewards, kl) with kl = log pi - log pi_ref per token (k1 estimator)."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -beta * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards = rewards.clone()
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl


def penalize_missing_eos(scores: torch.Tensor, finished: torch.Tensor, mode: str = "off",
                         penalty: float = 1.0) -> torch.Tensor:
    """The score of a completion that never emitted EOS: ``off`` keeps the reward
    model's (read at an appended EOS); ``replace`` makes it ``-penalty``
    (lm-human-preferences: -1, where most short responses finished); ``subtract``
    takes ``penalty`` off it, which keeps the reward model's ordering among the
    unfinished. Finished completions keep their score."""
    if mode == "off":
        return scores
    done = finished.to(device=scores.device, dtype=torch.bool)
    if mode == "replace":
        return torch.where(done, scores, torch.full_like(scores, -penalty))
    if mode == "subtract":
        return torch.where(done, scores, scores - penalty)
    raise ValueError(f"unknown missing-EOS mode {mode!r}; expected one of {MISSING_EOS_MODES}")


def rloo_advantages(scores: torch.Tensor, kl: torch.Tensor, beta: float, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024; TRL's RLOOTrainer): the
    sequence reward R = score - beta * sum_t kl_t, less the mean R of the other
    k-1 samples of the same prompt. The batch holds its prompts' samples in
    consecutive groups of ``k``. Returns one advantage per sequence."""
    rewards = scores - beta * kl.sum(1)
    groups = rewards.view(-1, k)
    baseline = (groups.sum(1, keepdim=True) - groups) / (k - 1)
    return (groups - baseline).reshape(-1)


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over the completion tokens.

    delta_t = r_t + gamma*V_{t+1} - V_t, A_t = delta_t + gamma*lam*A_{t+1}; the
    value after the last real token is 0 (the episode ends there). Returns
    (advantages, returns = advantages + values), zero on padding."""
    rewards, values = rewards * mask, values * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, max(-A*r, -A*clip(r, 1-c, 1+c)), masked mean.
    Returns the loss and its statistics: the ratio's arithmetic and geometric mean
    (``ratio_means``), clip fraction, approx KL."""
    diff = logprobs - old_logprobs
    ratio = torch.exp(diff)
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.max(loss1, loss2), mask)
    with torch.no_grad():
        arithmetic, geometric = ratio_means(logprobs, old_logprobs, mask)
        stats = {
            "ratio": arithmetic,
            "clipfrac": masked_mean((loss2 > loss1).float(), mask),
            "approxkl": 0.5 * masked_mean(diff ** 2, mask),
            "ratio_geometric": geometric,
        }
    return loss, stats


@torch.no_grad()
def ratio_means(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ratio pi/pi_old's arithmetic and geometric mean over the masked tokens:
    a few tokens whose ratio blew up move the first, a collapse of the whole
    minibatch the second."""
    diff = logprobs - old_logprobs
    return masked_mean(torch.exp(diff), mask), torch.exp(masked_mean(diff, mask))


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5*max((V-R)^2, (clip(V, V_old±c)-R)^2), masked mean
    (lm-human-preferences). Returns (loss, fraction clipped)."""
    clipped = torch.clamp(values, old_values - clip, old_values + clip)
    loss1 = (values - returns) ** 2
    loss2 = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(loss1, loss2), mask)
    return loss, masked_mean((loss2 > loss1).float(), mask).detach()


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R): 1 when the value head predicts the returns, 0 when
    it predicts nothing (it starts at zero)."""
    var_returns = masked_var(returns, mask, unbiased=False)
    if var_returns <= 0:
        return 0.0
    return float(1 - masked_var(returns - values, mask, unbiased=False) / var_returns)


# --- the KL coefficient ------------------------------------------------------------


@dataclass
class FixedKL:
    """A constant beta (InstructGPT found 0.01-0.02 best with a normalized reward)."""

    value: float

    def update(self, kl: float, n_episodes: int) -> None:  # noqa: ARG002 - same interface as AdaptiveKL
        return None


@dataclass
class AdaptiveKL:
    """lm-human-preferences' proportional controller (Ziegler et al. 2019):
    e = clip(KL/target - 1, -0.2, 0.2); beta <- beta * (1 + e * n / horizon),
    n = episodes in the batch. Target 6 nats, horizon 10,000 episodes."""

    value: float
    target: float = 6.0
    horizon: int = 10_000

    def update(self, kl: float, n_episodes: int) -> None:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_episodes / self.horizon
