"""KL-regularized PPO on one shared base model (DESIGN.md, "PPO loop").

One iteration, top to bottom (``PPOSession.iteration``):

1. sample a batch of completions from pi_bar, the current policy (``rollout``);
2. score each at its EOS with the reward model, normalized against the session's
   reference (its first batch is a sample of it), with the missing-EOS penalty
   as set (off by default: the embedded model finishes a third of its answers
   within 64 tokens, and a penalty would then be the only signal left); freeze
   pi_bar's log-probs, the reference's log-probs and the value head's values,
   all from logits / temperature;
3. shape the per-token reward -beta*(log pi - log pi_ref) + score at the last
   token; GAE (gamma 1, lambda 0.95); whiten the advantages over the batch;
4. several epochs over shuffled minibatches: clipped ratio pi_theta/pi_bar and a
   clipped value loss, one Adam step per minibatch (``update``);
5. update beta (fixed, or the adaptive controller).

The formulas live in ``rlhf.ppo_math``. The policy LoRA adapter and the value
head (on the policy's last hidden state) train together; the reference is the
policy as it was when the session started (a frozen adapter copy, or the bare
base); dropout is off because the stack is never put in train mode.

``run_job`` is the background job (``rlhf ppo``, the PPO screen): a short
session of N iterations or M minutes, a checkpoint per iteration registered as a
new policy version, pause / resume / stop between iterations, and resume of a
stopped session from its last checkpoint with the session's original reference.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import torch

from rlhf import ppo_math as pm
from rlhf.chat import chat_prompt_ids
from rlhf.errors import UserError
from rlhf.model_stack import ModelStack
from rlhf.reward_scoring import RewardScorer
from rlhf.rows import Checkpoint
from rlhf.rules import parse_rule
from rlhf.sampling import Sample, SamplingParams, generate
from rlhf.sampling_params import DEFINITION_KEYS
from rlhf.stats import correlation
from rlhf.tokens import completion_batch, completion_forward

# Metric names shown on the plots (TRL's, so users recognise them).
METRICS = ("objective/scores", "objective/kl", "objective/entropy", "objective/rlhf_reward",
           "policy/approxkl", "policy/clipfrac", "loss/policy", "loss/value", "val/ratio",
           "val/var_explained", "beta")
ROLLOUTS_FILE = "rollouts.json"
OPTIMIZER_FILE = "optimizer.pt"


@dataclass
class PPOConfig:
    """PPO hyperparameters. Sizes are scaled down for a CPU; the rest follow the
    sources named beside each."""

    # -- rollouts
    batch_size: int = 16            # episodes per iteration (lm-human-preferences: 512; CPU-sized)
    mini_batch_size: int = 4        # sequences per Adam step (TRL per_device_train_batch_size-like)
    forward_batch_size: int = 16    # sequences per no-grad forward at rollout (TRL local_rollout_forward_batch_size)
    epochs: int = 4                 # passes over each batch (TRL num_ppo_epochs, lm-human-preferences noptepochs)
    # How the policy answers: rlhf.sampling_params.SamplingParams, the one definition.
    # A session started without them takes its reward model's (``session_settings``).
    max_new_tokens: int = SamplingParams.max_new_tokens
    temperature: float = SamplingParams.temperature   # log-probs use logits / temperature
    top_p: float = SamplingParams.top_p
    # -- the reward
    # Normalize a reward model's scores on the session's first rollout batch (a
    # sample of its reference) to mean 0, std 1, so beta means the same in every
    # session (lm-human-preferences). Rules keep their own scale.
    normalize_reward: bool = True
    # A completion without EOS: 'off' scores it as the reward model reads it (EOS
    # appended, as in training); 'replace' gives it -missing_eos_penalty (OpenAI:
    # -1, where most responses finished); 'subtract' takes the penalty off its
    # score. Off by default: measured on the embedded model, 35% of answers end
    # within 64 tokens (23% within 32), so a penalty drowned the labels and PPO
    # learned "stop early" instead.
    missing_eos: str = "off"
    missing_eos_penalty: float = 1.0
    # -- optimisation
    # LoRA trains at ~10x the full-model rate (TRL's 3e-6 is for full weights).
    # Measured on the loop benchmark (`more=\d`, win-rate against the reference,
    # KL on held-out prompts): 1e-4 gave 0.68 at 6.5 nats after 12 iterations;
    # 3e-4 gave 0.68 at 10.1 after 7 and 0.90 at 22 after 12 -- faster, no more
    # preference per nat.
    learning_rate: float = 1e-4
    adam_eps: float = 1e-5          # "N implementation details" / lm-human-preferences
    max_grad_norm: float = 1.0      # TRL (transformers TrainingArguments default)
    # -- advantages and losses
    gamma: float = 1.0              # lm-human-preferences / TRL
    # lm-human-preferences / TRL. lam = 1 (the whole score on every token, less
    # reliance on the untrained value head) measured no better on the loop
    # benchmark (`more=\d`, 12 iterations): 0.57 against 0.68 win-rate at KL 6.7.
    lam: float = 0.95
    clip: float = 0.2               # policy ratio clip (TRL cliprange, lm-human-preferences)
    clip_value: float = 0.2         # value clip (TRL cliprange_value)
    vf_coef: float = 0.1            # value loss weight (TRL vf_coef, lm-human-preferences)
    # -- the KL penalty
    # Fixed beta; InstructGPT found 0.01-0.02 best, TRL defaults to 0.05. With the
    # score at std 1, beta 0.25 (lr 3e-4) held KL near 6 but learned nothing
    # (0.50 win-rate): in a short session the penalty is not what bounds KL, the
    # number of iterations is.
    beta: float = 0.05
    adaptive_kl: bool = False       # lm-human-preferences' proportional controller
    target_kl: float = 6.0          # nats per sequence (lm-human-preferences)
    kl_horizon: int = 10_000        # episodes (lm-human-preferences)
    # -- safety: a ratio this far from 1 means the update blew up
    max_ratio: float = 10.0
    seed: int | None = 0

    def __post_init__(self) -> None:
        if (self.batch_size < 2 or self.mini_batch_size < 1 or self.mini_batch_size > self.batch_size
                or self.forward_batch_size < 1):
            raise UserError("batch size must be at least 2 and the minibatch between 1 and the batch size")
        if self.epochs < 1 or self.max_new_tokens < 1:
            raise UserError("epochs and max new tokens must be at least 1")
        if self.temperature <= 0 or self.beta < 0 or self.learning_rate <= 0:
            raise UserError("temperature and learning rate must be > 0 and beta >= 0")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top-p must be in (0, 1], got {self.top_p}")
        if not (0 <= self.lam <= 1 and 0 <= self.gamma <= 1):
            raise UserError(f"GAE lambda and gamma must be in [0, 1], got {self.lam} and {self.gamma}")
        if self.missing_eos not in pm.MISSING_EOS_MODES:
            raise UserError(f"unknown missing-EOS setting {self.missing_eos!r}: use one of "
                            f"{', '.join(pm.MISSING_EOS_MODES)}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PPOConfig:
        """The PPO keys of a job config (other keys, such as the model, ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names and v is not None})


class Scorer(Protocol):
    """What PPO needs of a reward: one score per completion. ``rlhf.reward_scoring.RewardScorer``
    is one (it also offers ``renormalize``); a rule (``RuleScorer``) is another."""

    def score_ids(self, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                  finished: list[bool]) -> torch.Tensor: ...


# --- rule-based rewards: for tests and demos, no reward model needed --------------


@dataclass
class RuleScorer:
    """A reward computed by a rule (rlhf.rules) from each completion's text and ids."""

    name: str
    rule: Callable[[str, Sequence[int], bool], float]
    decode: Callable[[list[int]], str] | None = None  # ids -> text, for the rules that read text

    def score_ids(self, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                  finished: list[bool]) -> torch.Tensor:
        scores = [self.rule(self.decode(ids) if self.decode else "", ids, done)
                  for ids, done in zip(completion_ids, finished)]
        return torch.tensor(scores, dtype=torch.float32)


def rule_scorer(spec: str, eos_id: int | None, max_new_tokens: int,
                decode: Callable[[list[int]], str] | None = None) -> RuleScorer:
    """A rule reward from ``rule:NAME[=ARG]`` (rlhf.rules lists them): ``rule:short``
    (short answers that end in EOS), ``rule:distinct`` and ``rule:ids-below=N``
    (dense token-level signals even a small random model can follow), or any text
    rule the scripted labeler takes, such as ``rule:contains=WORD``."""
    return RuleScorer(spec, parse_rule(spec, eos_id=eos_id, budget=max_new_tokens, what="reward rule"), decode)


# --- one batch of experience --------------------------------------------------------


@dataclass
class Rollout:
    """A batch sampled from pi_bar with everything PPO freezes before updating."""

    prompts: list[str]
    samples: list[Sample]
    ids: torch.Tensor            # [B, Q+T] left-padded prompt + right-padded completion
    attention: torch.Tensor      # [B, Q+T]
    context: int                 # Q: completion tokens start here
    tokens: torch.Tensor         # [B, T] completion ids (pad after the end)
    mask: torch.Tensor           # [B, T] 1 on completion tokens, EOS included
    scores: torch.Tensor         # [B]
    logprobs: torch.Tensor       # [B, T] pi_bar, at the temperature
    ref_logprobs: torch.Tensor   # [B, T]
    values: torch.Tensor         # [B, T]
    rewards: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    kl: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    advantages: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    returns: torch.Tensor = field(default_factory=lambda: torch.zeros(0))

    def rows(self) -> list[dict[str, Any]]:
        """The batch for the live table: prompt, completion, score, sequence KL."""
        kl = self.kl.sum(1).tolist() if self.kl.numel() else [0.0] * len(self.samples)
        return [{"prompt": p, "completion": s.text, "score": float(sc), "kl": float(k),
                 "finish_reason": s.finish_reason, "n_tokens": s.n_tokens}
                for p, s, sc, k in zip(self.prompts, self.samples, self.scores.tolist(), kl)]


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


# --- the session --------------------------------------------------------------------


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

    def next_prompts(self) -> list[str]:
        """The next batch of prompts: a shuffled pass over all of them, repeated."""
        batch = []
        while len(batch) < self.config.batch_size:
            if not self._order:
                self._order = list(range(len(self.prompts)))
                self.rng.shuffle(self._order)
            batch.append(self.prompts[self._order.pop()])
        return batch

    # -- 1-3: experience

    @torch.no_grad()
    def rollout(self, prompts: Sequence[str]) -> Rollout:
        stack, cfg = self.stack, self.config
        tok = stack.tokenizer
        prompt_rows = [chat_prompt_ids(tok, p) for p in prompts]
        samples = generate(stack, prompt_rows, self.sampling, role="policy")
        layout = completion_batch(prompt_rows, [s.token_ids for s in samples], tok.pad_token_id)
        ids, attention = layout.ids.to(stack.device), layout.attention.to(stack.device)
        tokens, mask = layout.tokens.to(stack.device), layout.mask.float().to(stack.device)
        context = layout.context

        logprobs, ref_logprobs, values = [], [], []
        for rows in _chunks(len(samples), cfg.forward_batch_size):
            with stack.role("policy"):
                policy = completion_forward(stack, ids[rows], attention[rows], tokens[rows], context, cfg.temperature)
            logprobs.append(policy.logprobs)
            values.append(policy.values)
            with stack.role("reference"):
                reference = completion_forward(stack, ids[rows], attention[rows], tokens[rows], context,
                                               cfg.temperature)
            ref_logprobs.append(reference.logprobs)
        scores = self.score(prompt_rows, samples).to(stack.device)
        return Rollout(list(prompts), samples, ids, attention, context, tokens, mask, scores,
                       torch.cat(logprobs) * mask, torch.cat(ref_logprobs) * mask, torch.cat(values) * mask)

    def score(self, prompt_rows: list[list[int]], samples: Sequence[Sample]) -> torch.Tensor:
        """The reward of each sample: the scorer's, normalized against the session's
        reference on the session's first batch (which was sampled from it: the
        policy as the session started), then the missing-EOS setting."""
        finished = [s.finish_reason == "eos" for s in samples]
        scores = self.scorer.score_ids(prompt_rows, [s.token_ids for s in samples], finished).float()
        model = self.reward_model
        if model is not None and self.normalization is None:
            norm = model.renormalize(scores)
            scores = norm.gain * scores + norm.bias
            self.normalization = {"reward_gain": model.gain, "reward_bias": model.bias,
                                  "norm_batch_mean": norm.raw_mean, "norm_batch_std": norm.raw_std,
                                  "norm_samples": norm.n_samples}
        return pm.penalize_missing_eos(scores, torch.tensor(finished), self.config.missing_eos,
                                       self.config.missing_eos_penalty)

    def advantages(self, batch: Rollout) -> None:
        """Shaped rewards, GAE and whitened advantages, stored on the batch."""
        batch.rewards, batch.kl = pm.shaped_rewards(batch.scores, batch.logprobs, batch.ref_logprobs,
                                                    batch.mask, self.beta)
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
            for start in range(0, len(order), cfg.mini_batch_size):
                rows = order[start:start + cfg.mini_batch_size]
                mask = batch.mask[rows]
                with stack.role("policy"):
                    logprobs, logits, values = completion_forward(stack, batch.ids[rows], batch.attention[rows],
                                                                  batch.tokens[rows], batch.context, cfg.temperature)
                pg_loss, pg = pm.policy_loss(logprobs, batch.logprobs[rows], batch.advantages[rows], mask, cfg.clip)
                vf_loss, vf_clipfrac = pm.value_loss(values, batch.values[rows], batch.returns[rows], mask,
                                                     cfg.clip_value)
                loss = pg_loss + cfg.vf_coef * vf_loss
                step = {"loss/policy": float(pg_loss.detach()), "loss/value": float(vf_loss.detach()),
                        "val/ratio": float(pg["ratio"]), "policy/clipfrac": float(pg["clipfrac"]),
                        "policy/approxkl": float(pg["approxkl"]), "val/clipfrac": float(vf_clipfrac)}
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
        self.advantages(batch)
        before = self._snapshot()
        try:
            update = self.update(batch, iteration)
        except BaseException:  # diverged, or anything else mid-update: never leave half a step behind
            self._restore(before)
            raise
        metrics = {**self.batch_metrics(batch, beta), **update}
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad:
            self._restore(before)
            raise PPODiverged(self._diverged(iteration, f"{bad[0]} is not finite"))
        self.kl_ctl.update(metrics["objective/kl"], len(batch.samples))
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
            "val/var_explained": pm.explained_variance(batch.values, batch.returns, batch.mask),
            "val/num_eos_tokens": float(sum(finished)),
            "val/eos_fraction": sum(finished) / len(finished),
            "val/penalized_fraction": (0.0 if self.config.missing_eos == "off"
                                       else (len(finished) - sum(finished)) / len(finished)),
            "val/completion_tokens": float(lengths.mean()),
            "beta": beta,
        }
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


def _chunks(n: int, size: int) -> Iterator[list[int]]:
    for start in range(0, n, size):
        yield list(range(start, min(n, start + size)))


# --- rollouts on disk, for the live table ------------------------------------------


def write_rollouts(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(rows, indent=1))
    tmp.replace(path)  # atomic: the app never reads half a file


def rollouts_path(checkpoint_root: Path, job_id: int) -> Path:
    """Where a PPO job keeps its latest batch (beside the database's checkpoints)."""
    return Path(checkpoint_root) / f"ppo-job-{job_id}-{ROLLOUTS_FILE}"


def read_rollouts(checkpoint_root: Path, job_id: int) -> list[dict[str, Any]]:
    """The latest batch of a PPO job; [] before the first one is written."""
    path = rollouts_path(checkpoint_root, job_id)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return []


# --- the background job ------------------------------------------------------------


@dataclass
class Start:
    """Where a session starts: the policy to train, its reference, and counters."""

    policy_version: int
    reference_version: int
    iteration: int = 0
    beta: float | None = None
    state_folder: Path | None = None
    normalization: dict[str, float] | None = None   # a resumed session's reward gain and bias
    reward: Any = None                                # ... and the reward they were measured for


def prepare_stack(stack: ModelStack, store: Any, config: dict[str, Any]) -> Start:
    """Load the policy and reference of a new or resumed session into the stack.

    A new session trains from ``init_policy_version`` (None: the latest policy;
    0: the base) and measures KL from that same starting point. A resumed session
    continues from the latest checkpoint but keeps the reference of the session
    that wrote it: the reference is the policy as it was when the session
    started, not the checkpoint being resumed."""
    if config.get("resume"):
        last = resume_checkpoint(store)
        stack.load_adapter("policy", last.path)
        stack.policy_version = last.version
        ref = last.meta["reference_version"]
        stack.load_reference(store.checkpoint("policy", ref).path if ref else None)
        meta = last.meta
        normalization = {k: meta[k] for k in NORMALIZATION_KEYS if k in meta} if "reward_gain" in meta else None
        return Start(last.version, ref, int(meta.get("iteration", 0)), meta.get("beta"), Path(last.path),
                     normalization, meta.get("reward"))
    version = config.get("init_policy_version")
    checkpoint = store.checkpoint("policy", version) if version != 0 else None
    if checkpoint is None:
        return Start(0, 0)
    stack.load_policy(checkpoint.path, checkpoint.version)
    return Start(checkpoint.version, checkpoint.version)


def resume_checkpoint(store: Any) -> Checkpoint:
    """The checkpoint a resumed session continues from: the latest policy version,
    which must have been written by a PPO session (its meta names the reference)."""
    last = store.checkpoint("policy")
    if last is None or "reference_version" not in last.meta:
        raise UserError("nothing to resume: no PPO checkpoint yet; start a session with `rlhf ppo`")
    return last


def load_reward(stack: ModelStack, store: Any, config: dict[str, Any], max_new_tokens: int) -> Scorer:
    """A rule (``reward: 'rule:...'``) or the trained reward model (latest, or a version)."""
    spec = config.get("reward")
    if isinstance(spec, str) and spec.startswith("rule:"):
        tok = stack.tokenizer
        return rule_scorer(spec, tok.eos_token_id, max_new_tokens,
                           decode=lambda ids: tok.decode(ids, skip_special_tokens=True).strip())
    from rlhf.reward_scoring import load_scorer

    scorer = load_scorer(stack, store, spec)
    if scorer is None:
        raise UserError("no reward model: train one first (rlhf train-reward)")
    return scorer


NORMALIZATION_KEYS = ("reward_gain", "reward_bias", "norm_batch_mean", "norm_batch_std", "norm_samples")


def session_settings(store: Any, config: dict[str, Any]) -> dict[str, Any]:
    """The job config completed, so that a session samples as its reward model
    was trained: a new session without sampling options takes the definition of
    the completions its reward model was trained on; a resumed session keeps its
    own settings and reward (options given now override them)."""
    settings = dict(config)
    if config.get("resume"):
        meta = resume_checkpoint(store).meta
        saved = {**meta.get("config", {}), "reward": meta.get("reward")}
        return {**saved, **{k: v for k, v in config.items() if v is not None}}
    definition = reward_sampling(store, config.get("reward")) or {}
    for key in DEFINITION_KEYS:
        if settings.get(key) is None and key in definition:
            settings[key] = definition[key]
    return settings


def reward_sampling(store: Any, spec: Any) -> dict[str, Any] | None:
    """How the completions behind a reward version were sampled (None for a rule,
    imported text, or a reward version from before this was recorded)."""
    if isinstance(spec, str) and spec.startswith("rule:"):
        return None
    checkpoint = store.checkpoint("reward", None if spec is None else int(spec))
    return checkpoint.meta.get("sampling") if checkpoint else None


def sampling_mismatch(settings: dict[str, Any], store: Any) -> str | None:
    """A warning when the session samples otherwise than its reward model's labels
    were sampled: the reward model would then score a kind of text it never saw."""
    definition = reward_sampling(store, settings.get("reward"))
    if not definition:
        return None
    ppo = PPOConfig.from_dict(settings)
    differ = [f"{k} {getattr(ppo, k)} (labels: {definition[k]})" for k in DEFINITION_KEYS
              if k in definition and float(getattr(ppo, k)) != float(definition[k])]
    if not differ:
        return None
    return ("this session samples otherwise than the reward model's labels were sampled: " + ", ".join(differ)
            + "; the reward model will score text unlike what it learned from")


def session_prompts(store: Any, config: dict[str, Any]) -> list[str]:
    """The store's prompts, or a prompt file named in the config."""
    if config.get("prompt_file"):
        from rlhf.prompts import read_prompt_file

        return read_prompt_file(config["prompt_file"]).prompts
    return store_prompts(store)


def store_prompts(store: Any) -> list[str]:
    prompts = [p.text for p in store.prompts()]
    if not prompts:
        raise UserError(f"no prompts in {store.path}: add some with `rlhf prompts add FILE` (or `rlhf init`)")
    return prompts


def check_can_start(store: Any, config: dict[str, Any]) -> None:
    """The user errors a session would hit, found before a process is spawned."""
    config = session_settings(store, config)  # resuming: its checkpoint (or "nothing to resume"), own reward
    if not config.get("resume") and config.get("init_policy_version"):
        store.checkpoint("policy", config["init_policy_version"])  # raises when there is no such version
    spec = config.get("reward")
    if isinstance(spec, str) and spec.startswith("rule:"):
        rule_scorer(spec, 0, 1)
    elif spec is not None:
        store.checkpoint("reward", int(spec))
    elif store.checkpoint("reward") is None:
        raise UserError("no reward model: train one first (rlhf train-reward)")
    if not config.get("prompt_file"):
        store_prompts(store)
    if not config.get("iterations") and not config.get("minutes"):
        raise UserError("a PPO session needs an end: pass --iterations N or --minutes M")


def start_session(store: Any, config: dict[str, Any]) -> int:
    """Check the config and start the 'ppo' job in its own process; returns its id."""
    from rlhf.jobs import start_job

    check_can_start(store, config)
    return start_job(store, "ppo", config)


def run_job(ctx: Any) -> None:
    """The 'ppo' job: a short PPO session in this (background) process."""
    from rlhf.models import ModelOptions, load_stack

    config = session_settings(ctx.store, ctx.config)
    ppo = PPOConfig.from_dict(config)
    warning = sampling_mismatch(config, ctx.store)
    if warning:
        print(f"WARNING: {warning}", flush=True)
    if ppo.seed is not None:
        torch.manual_seed(ppo.seed)
    options = ModelOptions(source=config.get("model", "embedded"), quantize=config.get("quantize"),
                           device=config.get("device"))
    stack = load_stack(options, progress=lambda msg: print(msg, flush=True))
    start = prepare_stack(stack, ctx.store, config)
    scorer = load_reward(stack, ctx.store, config, ppo.max_new_tokens)
    reward = config.get("reward") if isinstance(scorer, RuleScorer) else getattr(scorer, "version", None)
    # A resumed session keeps its reward's scale, unless it now follows another
    # reward, which is then normalized on the first batch like a new session's.
    normalization = start.normalization if start.reward == reward else None
    session = PPOSession(stack, scorer, session_prompts(ctx.store, config), ppo, beta=start.beta,
                         normalization=normalization)
    if start.state_folder is not None:
        session.load_state(start.state_folder)
    iterations, minutes = config.get("iterations"), config.get("minutes")
    if iterations:
        ctx.set_total(start.iteration + int(iterations))
    save_every = max(1, int(config.get("save_every", 1)))
    began = time.monotonic()
    version, done, batch = start.policy_version, 0, None
    pending = False  # an iteration trained but not yet saved
    last_metrics: dict[str, float] = {}
    while True:
        try:
            ctx.checkpoint()  # pause / stop between iterations
            iteration = start.iteration + done + 1
            metrics, batch = session.iteration(iteration)
        except BaseException:
            # A stop, or an update that diverged (and was undone), keeps the
            # iterations trained before it.
            if pending and batch is not None:
                save_checkpoint(ctx, session, batch, start.iteration + done, version, start.reference_version,
                                last_metrics, reward)
            raise
        last_metrics = metrics
        done += 1
        ctx.log(iteration, metrics)
        write_rollouts(rollouts_path(ctx.checkpoint_root, ctx.job_id), batch.rows())
        pending = True
        finished = (iterations and done >= int(iterations)) or (minutes and time.monotonic() - began >= 60 * minutes)
        if done % save_every == 0 or finished:
            version = save_checkpoint(ctx, session, batch, iteration, version, start.reference_version, metrics,
                                      reward)
            pending = False
        if finished:
            break


def save_checkpoint(ctx: Any, session: PPOSession, batch: Rollout, iteration: int, parent: int,
                    reference_version: int, metrics: dict[str, float], reward: Any = None) -> int:
    """Save the policy adapter (with the value head) and optimizer; register it as
    the next policy version, with what a resumed session needs to go on as this
    one did (reference, beta, reward and its normalization, settings). Returns
    the version."""
    folder = Path(ctx.checkpoint_root) / "policy" / f"ppo-job{ctx.job_id}-iter{iteration}"
    meta = {"job_id": ctx.job_id, "iteration": iteration, "reference_version": reference_version,
            "beta": session.beta, "rollout_score": metrics["objective/scores"], "kl": metrics["objective/kl"],
            "reward": reward, **(session.normalization or {}), "config": asdict(session.config)}
    session.stack.save_adapter("policy", folder, meta)
    session.save_state(folder, batch)
    version = ctx.store.add_checkpoint("policy", folder, job_id=ctx.job_id, parent_version=parent, meta=meta)
    session.stack.policy_version = version
    print(f"iteration {iteration}: saved policy version {version} ({folder})", flush=True)
    return version
