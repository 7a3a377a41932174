"""A PPO session in memory: ``PPOSession`` runs iterations on one shared base model (DESIGN.md, "PPO loop").

One iteration, top to bottom (``PPOSession.iteration``):

1. sample a batch of completions from pi_bar, the current policy (``rollout``);
2. score each at its EOS with the reward model, normalized against the session's
   reference (its first batch is a sample of it), with the missing-EOS penalty
   as set (off by default: the embedded model finishes a third of its answers
   within 64 tokens, and a penalty would then be the only signal left); freeze
   pi_bar's log-probs, the reference's log-probs and the value head's values,
   all from logits / temperature;
3. shape the per-token reward -beta*(log pi - log pi_ref) + score at the last
   token; GAE (gamma 1, lambda 0.95); whiten the advantages over the batch.
   With ``algorithm='rloo'`` instead: k samples per prompt, each sequence's
   reward less the mean of its prompt's other k-1, on every token, scaled to
   unit spread; no value head;
4. several epochs over shuffled minibatches: clipped ratio pi_theta/pi_bar and a
   clipped value loss, one Adam step per minibatch (``update``);
5. update beta (fixed, or the adaptive controller).

The formulas live in ``rlhf.ppo_math``, the batch in ``rlhf.ppo_rollout``. The
policy LoRA adapter and the value head (on the policy's last hidden state) train
together; the reference is the policy as it was when the session started (a
frozen adapter copy, or the bare base); dropout is off because the stack is
never put in train mode. An update that diverges is undone whole.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from rlhf import ppo_math as pm
from rlhf.errors import UserError
from rlhf.model_stack import ModelStack
from rlhf.ppo_config import PPOConfig
from rlhf.ppo_rollout import ROLLOUTS_FILE, Rollout, Scorer, collect_rollout, write_rollouts
from rlhf.reward_scoring import RewardScorer
from rlhf.sampling import Sample, SamplingParams
from rlhf.stats import correlation
from rlhf.tokens import completion_forward

# Metric names shown on the plots (TRL's, so users recognise them).
METRICS = ("objective/scores", "objective/kl", "objective/entropy", "objective/rlhf_reward",
           "policy/approxkl", "policy/clipfrac", "loss/policy", "loss/value", "val/ratio",
           "val/var_explained", "beta")
OPTIMIZER_FILE = "optimizer.pt"
# The reward normalization a session keeps in its checkpoints' meta, so that a
# resumed session scores on the same scale.
NORMALIZATION_KEYS = ("reward_gain", "reward_bias", "norm_batch_mean", "norm_batch_std", "norm_samples")


# Above this fraction of a batch scored by the missing-EOS penalty, the penalty,
# not the reward model, is what PPO learns from.
PENALTY_WARNING = 0.5


def penalty_warning(metrics: dict[str, float]) -> str | None:
    """What to tell the researcher when most of a batch scored the missing-EOS penalty."""
    penalized = metrics.get("val/penalized_fraction", 0.0)
    if penalized <= PENALTY_WARNING:
        return None
    return (f"{penalized:.0%} of the batch never emitted EOS and scored the missing-EOS penalty: PPO is learning "
            "to stop, not your labels; use missing EOS 'off' (the default) or a longer length budget")


class PPODiverged(UserError):
    """The update produced a NaN or an exploding ratio; nothing of it is saved."""


class KLBudgetSpent(Exception):
    """A batch's KL passed the session's --kl-budget: the session ends before
    training on it. Carries the batch and what it measured."""

    def __init__(self, kl: float, budget: float, metrics: dict[str, float], batch: Rollout) -> None:
        super().__init__(f"the batch's KL {kl:.2f} passed the budget of {budget:g} nats")
        self.kl, self.budget, self.metrics, self.batch = kl, budget, metrics, batch


class PPOSession:
    """PPO state across iterations: the optimizer, beta, and where the prompts are."""

    def __init__(self, stack: ModelStack, scorer: Scorer, prompts: Sequence[str], config: PPOConfig,
                 *, beta: float | None = None, normalization: dict[str, float] | None = None,
                 on_minibatch: Callable[[dict[str, float]], None] | None = None) -> None:
        """``normalization``: the reward gain and bias a resumed session keeps (the
        NORMALIZATION_KEYS of its last checkpoint); None for a new session, which
        normalizes on its first batch. ``on_minibatch`` sees the statistics of every
        minibatch (its ratio, losses, clip fraction) before its step is taken."""
        if not prompts:
            raise UserError("no prompts for PPO: add some with `rlhf prompts add FILE`")
        self.stack, self.scorer, self.config = stack, scorer, config
        self.prompts = list(prompts)
        self.normalization: dict[str, float] | None = None
        if normalization is not None and self.reward_model is not None:
            self.reward_model.gain, self.reward_model.bias = normalization["reward_gain"], normalization["reward_bias"]
            self.normalization = dict(normalization)
        start = config.beta if beta is None else beta
        self.kl_ctl: pm.FixedKL | pm.AdaptiveKL = (
            pm.AdaptiveKL(start, config.target_kl, config.kl_horizon) if config.adaptive_kl else pm.FixedKL(start))
        self.params = stack.adapter_parameters("policy") + list(stack.value_head.parameters())
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = torch.optim.Adam(self.params, lr=config.learning_rate, eps=config.adam_eps)
        self.rng = random.Random(config.seed)
        self._order: list[int] = []
        self.sampling = SamplingParams(temperature=config.temperature, top_p=config.top_p,
                                       max_new_tokens=config.max_new_tokens, batch_size=config.batch_size)
        self.on_minibatch = on_minibatch

    @property
    def beta(self) -> float:
        return self.kl_ctl.value

    @property
    def reward_model(self) -> RewardScorer | None:
        """The scorer, when it is a reward model this session normalizes (rules
        keep their own scale)."""
        return self.scorer if self.config.normalize_reward and isinstance(self.scorer, RewardScorer) else None

    @property
    def samples_per_prompt(self) -> int:
        return self.config.rloo_k if self.config.algorithm == "rloo" else 1

    def next_prompts(self) -> list[str]:
        """The next batch of prompts: a shuffled pass over all of them, repeated;
        each prompt ``samples_per_prompt`` times in a row (RLOO's groups)."""
        batch: list[str] = []
        per_prompt = self.samples_per_prompt
        while len(batch) < self.config.batch_size:
            if not self._order:
                self._order = list(range(len(self.prompts)))
                self.rng.shuffle(self._order)
            batch.extend([self.prompts[self._order.pop()]] * per_prompt)
        return batch

    # -- 1-3: experience

    def rollout(self, prompts: Sequence[str]) -> Rollout:
        """A batch sampled from the policy as it is now, scored by ``score``."""
        return collect_rollout(self.stack, prompts, self.config, self.sampling, self.score)

    def score(self, prompt_rows: list[list[int]], samples: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        """The reward of each sample and its spread: the scorer's, normalized
        against the session's reference on the session's first batch (which was
        sampled from it: the policy as the session started); less
        ``uncertainty_penalty`` times the reward ensemble's spread; then the
        missing-EOS setting."""
        finished = [s.finish_reason == "eos" for s in samples]
        ids = [s.token_ids for s in samples]
        model = self.reward_model
        if model is None:
            scores = self.scorer.score_ids(prompt_rows, ids, finished).float()
            spread = torch.zeros_like(scores)
        else:
            heads = model.heads_ids(prompt_rows, ids).float()
            if self.normalization is None:
                norm = model.renormalize(heads.mean(-1))
                heads = norm.gain * heads + norm.bias
                self.normalization = {"reward_gain": model.gain, "reward_bias": model.bias,
                                      "norm_batch_mean": norm.raw_mean, "norm_batch_std": norm.raw_std,
                                      "norm_samples": norm.n_samples}
            scores = heads.mean(-1)
            spread = heads.std(-1) if heads.shape[-1] > 1 else torch.zeros_like(scores)
        scores = scores - self.config.uncertainty_penalty * spread
        return pm.penalize_missing_eos(scores, torch.tensor(finished), self.config.missing_eos,
                                       self.config.missing_eos_penalty), spread

    def advantages(self, batch: Rollout) -> None:
        """Shaped rewards, GAE and whitened advantages (or RLOO's), stored on the batch."""
        batch.rewards, batch.kl = pm.shaped_rewards(batch.scores, batch.logprobs, batch.ref_logprobs,
                                                    batch.mask, self.beta)
        if self.config.algorithm == "rloo":
            advantages = pm.rloo_advantages(batch.scores, batch.kl, self.beta, self.config.rloo_k)
            # Unit spread over the batch, as PPO's whitened advantages, so one learning rate serves both.
            advantages = advantages / (advantages.std() + 1e-8)
            batch.advantages = advantages[:, None] * batch.mask
            return
        advantages, batch.returns = pm.compute_gae(batch.rewards, batch.values, batch.mask,
                                                   self.config.gamma, self.config.lam)
        batch.advantages = pm.masked_whiten(advantages, batch.mask)

    # -- 4: the update

    def update(self, batch: Rollout, iteration: int) -> dict[str, float]:
        """Epochs of clipped-ratio minibatch steps; returns averaged statistics.
        Every minibatch is checked before its step (finite losses, a sane ratio in
        both directions) and its gradient before it is applied; the parameters and
        the optimizer state after the last step. ``iteration`` undoes the whole
        update when any check fails."""
        cfg, stack = self.config, self.stack
        stats: dict[str, list[float]] = {}
        generator = torch.Generator().manual_seed(self.rng.randrange(2**31))
        for _epoch in range(cfg.epochs):
            order = torch.randperm(len(batch.samples), generator=generator).tolist()
            for start in range(0, len(order), cfg.minibatch):
                rows = order[start:start + cfg.minibatch]
                mask = batch.mask[rows]
                with stack.role("policy"):
                    logprobs, logits, values = completion_forward(stack, batch.ids[rows], batch.attention[rows],
                                                                  batch.tokens[rows], batch.context, cfg.temperature)
                pg_loss, pg = pm.policy_loss(logprobs, batch.logprobs[rows], batch.advantages[rows], mask, cfg.clip)
                step = {"loss/policy": float(pg_loss.detach()), "val/ratio": float(pg["ratio"]),
                        "policy/clipfrac": float(pg["clipfrac"]), "policy/approxkl": float(pg["approxkl"])}
                loss = pg_loss
                if cfg.algorithm == "ppo":  # RLOO has no value head to train
                    vf_loss, vf_clipfrac = pm.value_loss(values, batch.values[rows], batch.returns[rows], mask,
                                                         cfg.clip_value)
                    loss = pg_loss + cfg.vf_coef * vf_loss
                    step.update({"loss/value": float(vf_loss.detach()), "val/clipfrac": float(vf_clipfrac)})
                self._check(step, iteration, float(pg["ratio_geometric"]))
                if self.on_minibatch:
                    self.on_minibatch(step)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                # clip_grad_norm_ turns an inf gradient into NaN weights silently: check its norm first.
                norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                if not torch.isfinite(norm):
                    raise PPODiverged(self._diverged(iteration, f"the gradient norm is {float(norm)}"))
                self.optimizer.step()
                with torch.no_grad():
                    step["policy/entropy"] = float(pm.masked_mean(
                        pm.entropy_from_logits(logits.detach(), cfg.temperature), mask))
                for k, v in step.items():
                    stats.setdefault(k, []).append(v)
        self._check_state(iteration)
        self._check_last_step(batch, rows, iteration)
        return {k: sum(v) / len(v) for k, v in stats.items()}

    def _diverged(self, iteration: int, what: str) -> str:
        return (f"PPO diverged at iteration {iteration}: {what}; nothing of this iteration was saved: "
                "lower --lr or raise --beta, then `rlhf ppo --resume`")

    def _check(self, step: dict[str, float], iteration: int, geometric: float) -> None:
        """Before a step, so a NaN never reaches the weights: finite statistics, and
        the minibatch's ratio within 1/max_ratio..max_ratio both ways (its
        arithmetic mean upwards, its geometric mean downwards)."""
        bad = next((k for k, v in step.items() if not math.isfinite(v)), None)
        if bad is not None:
            raise PPODiverged(self._diverged(iteration, f"{bad} is {step[bad]}"))
        self._check_ratio(iteration, geometric, step["val/ratio"])

    def _check_ratio(self, iteration: int, low: float, high: float) -> None:
        limit = self.config.max_ratio
        if not (math.isfinite(low) and math.isfinite(high)):
            raise PPODiverged(self._diverged(iteration, "the ratio pi/pi_old is not finite"))
        if high > limit:
            raise PPODiverged(self._diverged(iteration, f"the ratio pi/pi_old reached {high:.3g} (> {limit:g})"))
        if low < 1 / limit:
            raise PPODiverged(self._diverged(iteration, f"the ratio pi/pi_old fell to {low:.3g} (< 1/{limit:g})"))

    @torch.no_grad()
    def _check_last_step(self, batch: Rollout, rows: list[int], iteration: int) -> None:
        """The last step is checked by nothing before it: the ratio of its own
        minibatch, recomputed after it (a no-grad forward of a few sequences)."""
        with self.stack.role("policy"):
            logprobs = completion_forward(self.stack, batch.ids[rows], batch.attention[rows], batch.tokens[rows],
                                          batch.context, self.config.temperature).logprobs
        arithmetic, geometric = pm.ratio_means(logprobs, batch.logprobs[rows], batch.mask[rows])
        self._check_ratio(iteration, float(geometric), float(arithmetic))

    def _check_state(self, iteration: int) -> None:
        """After the last step: every trained parameter and every optimizer moment finite."""
        tensors = [("a policy parameter", p) for p in self.params] + [
            ("the optimizer state", v) for state in self.optimizer.state.values()
            for v in state.values() if torch.is_tensor(v)]
        for what, tensor in tensors:
            if not torch.isfinite(tensor).all():
                raise PPODiverged(self._diverged(iteration, f"{what} is not finite after the update"))

    def _snapshot(self) -> tuple[list[torch.Tensor], dict[str, Any]]:
        return [p.detach().clone() for p in self.params], copy.deepcopy(self.optimizer.state_dict())

    @torch.no_grad()
    def _restore(self, snapshot: tuple[list[torch.Tensor], dict[str, Any]]) -> None:
        params, optimizer = snapshot
        for p, saved in zip(self.params, params):
            p.copy_(saved)
        self.optimizer.load_state_dict(optimizer)

    # -- one whole iteration

    def iteration(self, iteration: int) -> tuple[dict[str, float], Rollout]:
        """Sample, score, update, adapt beta. Returns (metrics, the batch). When the
        update diverges, the policy, value head and optimizer are put back as they
        were before it, and PPODiverged says why."""
        started = time.monotonic()
        batch = self.rollout(self.next_prompts())
        if not torch.isfinite(batch.scores).all():
            raise PPODiverged(f"PPO stopped at iteration {iteration}: the reward gave a non-finite score; "
                              "nothing of this iteration was saved: check the reward model")
        beta = self.beta
        self.advantages(batch)  # also the batch's KL
        metrics = self.batch_metrics(batch, beta)
        budget = self.config.kl_budget
        if budget is not None and metrics["objective/kl"] > budget:
            metrics.update({f"time/{stage}_s": s for stage, s in batch.seconds.items()})
            metrics["time/iteration_s"] = time.monotonic() - started
            raise KLBudgetSpent(metrics["objective/kl"], budget, metrics, batch)
        before = self._snapshot()
        clock = time.monotonic()
        try:
            update = self.update(batch, iteration)
        except BaseException:  # diverged, or anything else mid-update: never leave half a step behind
            self._restore(before)
            raise
        metrics = {**metrics, **update}
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad:
            self._restore(before)
            raise PPODiverged(self._diverged(iteration, f"{bad[0]} is not finite"))
        self.kl_ctl.update(metrics["objective/kl"], len(batch.samples))
        # Where the time goes (issue: speed): sampling, the teacher-forced passes
        # (policy, reference, values), the reward, the update.
        metrics.update({f"time/{stage}_s": s for stage, s in batch.seconds.items()})
        metrics["time/update_s"] = time.monotonic() - clock
        metrics["time/iteration_s"] = time.monotonic() - started
        return metrics, batch

    @torch.no_grad()
    def batch_metrics(self, batch: Rollout, beta: float) -> dict[str, float]:
        """What the rollout batch says (TRL's names where TRL has one): score and
        its spread, KL, entropy, how many answers finished, and their length."""
        scores = batch.scores
        lengths = batch.mask.sum(1)
        finished = [s.finish_reason == "eos" for s in batch.samples]
        non_score = float((-beta * batch.kl).sum(1).mean())
        metrics = {
            "objective/scores": float(scores.mean()),
            "objective/scores_std": float(scores.std()) if len(scores) > 1 else 0.0,
            "objective/kl": float(batch.kl.sum(1).mean()),
            # TRL's: the sampled tokens' summed -log p, a per-sequence entropy estimate
            "objective/entropy": float((-batch.logprobs * batch.mask).sum(1).mean()),
            "objective/non_score_reward": non_score,
            "objective/rlhf_reward": float(scores.mean()) + non_score,
            "val/num_eos_tokens": float(sum(finished)),
            "val/eos_fraction": sum(finished) / len(finished),
            "val/penalized_fraction": (0.0 if self.config.missing_eos == "off"
                                       else (len(finished) - sum(finished)) / len(finished)),
            "val/completion_tokens": float(lengths.mean()),
            "beta": beta,
        }
        if self.reward_model is not None and self.reward_model.stack.reward_head.out_features > 1:
            # The reward ensemble's disagreement on this batch: it rises when the policy
            # leaves what the labels cover (over-optimization; Coste et al. 2023).
            metrics["reward/spread"] = float(batch.spread.mean())
        if batch.returns.numel():  # PPO's value head; RLOO has none
            metrics["val/var_explained"] = pm.explained_variance(batch.values, batch.returns, batch.mask)
        corr = correlation(scores.tolist(), lengths.tolist())
        if corr is not None:  # undefined when every answer has the same length
            metrics["val/score_length_corr"] = corr
        return metrics

    # -- state kept with a checkpoint

    def save_state(self, folder: Path, batch: Rollout | None) -> None:
        torch.save(self.optimizer.state_dict(), folder / OPTIMIZER_FILE)
        if batch is not None:
            write_rollouts(folder / ROLLOUTS_FILE, batch.rows())

    def load_state(self, folder: Path) -> bool:
        path = folder / OPTIMIZER_FILE
        if not path.exists():
            return False
        self.optimizer.load_state_dict(torch.load(path, map_location=self.stack.device))
        return True
