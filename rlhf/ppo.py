"""KL-regularized PPO on one shared base model (DESIGN.md, "PPO loop").

One iteration, top to bottom (``PPOSession.iteration``):

1. sample a batch of completions from pi_bar, the current policy (``rollout``);
2. score each at its EOS with the reward model (a fixed penalty without EOS: the
   scorer applies it), and freeze pi_bar's log-probs, the reference's log-probs
   and the value head's values, all from logits / temperature;
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

import json
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import torch

from rlhf import ppo_math as pm
from rlhf.errors import UserError
from rlhf.models import ModelStack
from rlhf.sampling import Sample, SamplingParams, chat_prompt_ids, generate, left_pad

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
    max_new_tokens: int = 32        # response length (TRL response_length 53; CPU-sized)
    temperature: float = 0.7        # lm-human-preferences / TRL; log-probs use logits / temperature
    top_p: float = 1.0              # sample the full distribution, as the ratio assumes (TRL)
    # -- optimisation
    learning_rate: float = 1e-4     # LoRA trains ~10x the full-model rate (TRL's 3e-6 is for full weights)
    adam_eps: float = 1e-5          # "N implementation details" / lm-human-preferences
    max_grad_norm: float = 1.0      # TRL (transformers TrainingArguments default)
    # -- advantages and losses
    gamma: float = 1.0              # lm-human-preferences / TRL
    lam: float = 0.95               # lm-human-preferences / TRL
    clip: float = 0.2               # policy ratio clip (TRL cliprange, lm-human-preferences)
    clip_value: float = 0.2         # value clip (TRL cliprange_value)
    vf_coef: float = 0.1            # value loss weight (TRL vf_coef, lm-human-preferences)
    # -- the KL penalty
    beta: float = 0.05              # fixed beta; InstructGPT found 0.01-0.02 best, TRL defaults to 0.05
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

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PPOConfig:
        """The PPO keys of a job config (other keys, such as the model, ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names and v is not None})


class Scorer(Protocol):
    """What PPO needs of a reward: one score per completion (penalty without EOS
    included). ``rlhf.reward.RewardScorer`` is one; the rules below are others."""

    def score_ids(self, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                  finished: list[bool]) -> torch.Tensor: ...


# --- rule-based rewards: for tests and demos, no reward model needed --------------


@dataclass
class RuleScorer:
    """A reward computed from the completion's token ids by a fixed rule."""

    name: str
    rule: Callable[[list[int]], float]
    # None: no penalty (a random test model never emits EOS, and the rule stays dense).
    no_eos_penalty: float | None = None

    def score_ids(self, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                  finished: list[bool]) -> torch.Tensor:
        scores = [self.rule(ids) if done or self.no_eos_penalty is None else self.no_eos_penalty
                  for ids, done in zip(completion_ids, finished)]
        return torch.tensor(scores, dtype=torch.float32)


def rule_scorer(spec: str, eos_id: int, max_new_tokens: int) -> RuleScorer:
    """A rule reward from ``rule:NAME[=ARG]``:

    - ``rule:short``: 1 - length/max_new_tokens for a completion that ends in EOS,
      -1 (OpenAI's no-EOS penalty) for one that does not;
    - ``rule:token=ID``: +1 per occurrence of token ID;
    - ``rule:distinct``: the fraction of distinct tokens (against repetition;
      dense, so even a small random model gets a learning signal);
    - ``rule:ids-below=N``: the fraction of completion tokens with id < N (dense:
      every token counts, so even a random model gets a learning signal)."""
    body = spec.removeprefix("rule:")
    name, _, arg = body.partition("=")
    try:
        if name == "short":
            return RuleScorer(spec, lambda ids: 1.0 - len(ids) / max_new_tokens, no_eos_penalty=-1.0)
        if name == "token":
            token = int(arg)
            return RuleScorer(spec, lambda ids: float(sum(1 for t in ids if t == token)))
        if name == "distinct" and not arg:
            return RuleScorer(spec, lambda ids: len(set(ids)) / max(len(ids), 1))
        if name == "ids-below":
            limit = int(arg)
            return RuleScorer(spec, lambda ids: sum(1 for t in ids if t < limit and t != eos_id) / max(len(ids), 1))
    except ValueError:
        pass
    raise UserError(f"unknown reward rule {spec!r}: use rule:short, rule:token=ID, rule:distinct or rule:ids-below=N, "
                    "or leave --reward out to use the trained reward model")


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


def position_ids(attention: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token, as ``generate`` counts
    them for left-padded prompts (TRL's ``forward`` does the same)."""
    return (attention.cumsum(1) - 1).clamp(min=0)


def policy_forward(stack: ModelStack, ids: torch.Tensor, attention: torch.Tensor,
                   context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, values) at the positions that predict each completion token.
    Runs under whatever role is active."""
    out = stack.body(input_ids=ids, attention_mask=attention, position_ids=position_ids(attention),
                     use_cache=False)
    hidden = out.last_hidden_state[:, context - 1:-1].float()
    return stack.logits(hidden), stack.value_head(hidden).squeeze(-1)


class PPODiverged(UserError):
    """The update produced a NaN or an exploding ratio; nothing of it is saved."""


# --- the session --------------------------------------------------------------------


class PPOSession:
    """PPO state across iterations: the optimizer, beta, and where the prompts are."""

    def __init__(self, stack: ModelStack, scorer: Scorer, prompts: Sequence[str], config: PPOConfig,
                 *, beta: float | None = None) -> None:
        if not prompts:
            raise UserError("no prompts for PPO: add some with `rlhf prompts add FILE`")
        self.stack, self.scorer, self.config = stack, scorer, config
        self.prompts = list(prompts)
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
        # Hooks for tests: the ratio of every minibatch as it is computed.
        self.on_minibatch: Callable[[dict[str, float]], None] | None = None

    @property
    def beta(self) -> float:
        return self.kl_ctl.value

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
        query, query_mask = left_pad(prompt_rows, tok.pad_token_id)
        T = max(s.n_tokens for s in samples)
        tokens = torch.full((len(samples), T), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(samples), T), dtype=torch.float32)
        for i, s in enumerate(samples):
            tokens[i, :s.n_tokens] = torch.tensor(s.token_ids)
            mask[i, :s.n_tokens] = 1
        ids = torch.cat([query, tokens], 1).to(stack.device)
        attention = torch.cat([query_mask, mask.long()], 1).to(stack.device)
        tokens, mask = tokens.to(stack.device), mask.to(stack.device)
        context = query.shape[1]

        logprobs, ref_logprobs, values = [], [], []
        for rows in _chunks(len(samples), cfg.forward_batch_size):
            with stack.role("policy"):
                logits, value = policy_forward(stack, ids[rows], attention[rows], context)
            logprobs.append(pm.logprobs_from_logits(logits, tokens[rows], cfg.temperature))
            values.append(value)
            with stack.role("reference"):
                ref_logits, _ = policy_forward(stack, ids[rows], attention[rows], context)
            ref_logprobs.append(pm.logprobs_from_logits(ref_logits, tokens[rows], cfg.temperature))
        scores = self.scorer.score_ids(prompt_rows, [s.token_ids for s in samples],
                                       [s.finish_reason == "eos" for s in samples]).float().to(stack.device)
        return Rollout(list(prompts), samples, ids, attention, context, tokens, mask, scores,
                       torch.cat(logprobs) * mask, torch.cat(ref_logprobs) * mask, torch.cat(values) * mask)

    def advantages(self, batch: Rollout) -> None:
        """Shaped rewards, GAE and whitened advantages, stored on the batch."""
        batch.rewards, batch.kl = pm.shaped_rewards(batch.scores, batch.logprobs, batch.ref_logprobs,
                                                    batch.mask, self.beta)
        advantages, batch.returns = pm.compute_gae(batch.rewards, batch.values, batch.mask,
                                                   self.config.gamma, self.config.lam)
        batch.advantages = pm.masked_whiten(advantages, batch.mask)

    # -- 4: the update

    def update(self, batch: Rollout, iteration: int) -> dict[str, float]:
        """Epochs of clipped-ratio minibatch steps; returns averaged statistics."""
        cfg, stack = self.config, self.stack
        stats: dict[str, list[float]] = {}
        generator = torch.Generator().manual_seed(self.rng.randrange(2**31))
        for _epoch in range(cfg.epochs):
            order = torch.randperm(len(batch.samples), generator=generator).tolist()
            for start in range(0, len(order), cfg.mini_batch_size):
                rows = order[start:start + cfg.mini_batch_size]
                mask = batch.mask[rows]
                with stack.role("policy"):
                    logits, values = policy_forward(stack, batch.ids[rows], batch.attention[rows], batch.context)
                logprobs = pm.logprobs_from_logits(logits, batch.tokens[rows], cfg.temperature)
                pg_loss, pg = pm.policy_loss(logprobs, batch.logprobs[rows], batch.advantages[rows], mask, cfg.clip)
                vf_loss, vf_clipfrac = pm.value_loss(values, batch.values[rows], batch.returns[rows], mask,
                                                     cfg.clip_value)
                loss = pg_loss + cfg.vf_coef * vf_loss
                step = {"loss/policy": float(pg_loss.detach()), "loss/value": float(vf_loss.detach()),
                        "val/ratio": float(pg["ratio"]), "policy/clipfrac": float(pg["clipfrac"]),
                        "policy/approxkl": float(pg["approxkl"]), "val/clipfrac": float(vf_clipfrac)}
                self._check(step, iteration)  # before the step: a NaN never reaches the weights
                if self.on_minibatch:
                    self.on_minibatch(step)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                self.optimizer.step()
                with torch.no_grad():
                    step["policy/entropy"] = float(pm.masked_mean(
                        pm.entropy_from_logits(logits.detach(), cfg.temperature), mask))
                for k, v in step.items():
                    stats.setdefault(k, []).append(v)
        return {k: sum(v) / len(v) for k, v in stats.items()}

    def _check(self, step: dict[str, float], iteration: int) -> None:
        bad = next((k for k, v in step.items() if not torch.isfinite(torch.tensor(v))), None)
        if bad is not None:
            raise PPODiverged(f"PPO diverged at iteration {iteration}: {bad} is {step[bad]}; nothing of this "
                              "iteration was saved: lower --lr or raise --beta, then `rlhf ppo --resume`")
        if step["val/ratio"] > self.config.max_ratio:
            raise PPODiverged(f"PPO diverged at iteration {iteration}: the ratio pi/pi_old reached "
                              f"{step['val/ratio']:.3g} (> {self.config.max_ratio:g}); nothing of this iteration "
                              "was saved: lower --lr or raise --beta, then `rlhf ppo --resume`")

    # -- one whole iteration

    def iteration(self, iteration: int) -> tuple[dict[str, float], Rollout]:
        """Sample, score, update, adapt beta. Returns (metrics, the batch)."""
        started = time.monotonic()
        batch = self.rollout(self.next_prompts())
        if not torch.isfinite(batch.scores).all():
            raise PPODiverged(f"PPO stopped at iteration {iteration}: the reward gave a non-finite score; "
                              "nothing of this iteration was saved: check the reward model")
        beta = self.beta
        self.advantages(batch)
        update = self.update(batch, iteration)
        with torch.no_grad():
            kl = float(batch.kl.sum(1).mean())
            non_score = float((-beta * batch.kl).sum(1).mean())
            metrics = {
                "objective/scores": float(batch.scores.mean()),
                "objective/kl": kl,
                # TRL's: the sampled tokens' summed -log p, a per-sequence entropy estimate
                "objective/entropy": float((-batch.logprobs * batch.mask).sum(1).mean()),
                "objective/non_score_reward": non_score,
                "objective/rlhf_reward": float(batch.scores.mean()) + non_score,
                "val/var_explained": pm.explained_variance(batch.values, batch.returns, batch.mask),
                "val/eos_fraction": sum(s.finish_reason == "eos" for s in batch.samples) / len(batch.samples),
                "val/completion_tokens": float(batch.mask.sum(1).mean()),
                "beta": beta,
                **update,
            }
        bad = [k for k, v in metrics.items() if v != v or abs(v) == float("inf")]
        if bad:
            raise PPODiverged(f"PPO diverged at iteration {iteration}: {bad[0]} is not finite; nothing of this "
                              "iteration was saved: lower --lr or raise --beta, then `rlhf ppo --resume`")
        self.kl_ctl.update(kl, len(batch.samples))
        metrics["time/iteration_s"] = time.monotonic() - started
        return metrics, batch

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


def prepare_stack(stack: ModelStack, store: Any, config: dict[str, Any]) -> Start:
    """Load the policy and reference of a new or resumed session into the stack.

    A new session trains from ``init_policy_version`` (None: the latest policy;
    0: the base) and measures KL from that same starting point. A resumed session
    continues from the latest checkpoint but keeps the reference of the session
    that wrote it: the reference is the policy as it was when the session
    started, not the checkpoint being resumed."""
    if config.get("resume"):
        last = resume_checkpoint(store)
        stack.load_adapter("policy", last["path"])
        stack.policy_version = last["version"]
        ref = last["meta"]["reference_version"]
        stack.load_reference(store.checkpoint("policy", ref)["path"] if ref else None)
        return Start(last["version"], ref, int(last["meta"].get("iteration", 0)),
                     last["meta"].get("beta"), Path(last["path"]))
    version = config.get("init_policy_version")
    checkpoint = store.checkpoint("policy", version) if version != 0 else None
    if checkpoint is None:
        return Start(0, 0)
    stack.load_policy(checkpoint["path"], checkpoint["version"])
    return Start(checkpoint["version"], checkpoint["version"])


def resume_checkpoint(store: Any) -> dict[str, Any]:
    """The checkpoint a resumed session continues from: the latest policy version,
    which must have been written by a PPO session (its meta names the reference)."""
    last = store.checkpoint("policy")
    if last is None or "reference_version" not in last["meta"]:
        raise UserError("nothing to resume: no PPO checkpoint yet; start a session with `rlhf ppo`")
    return last


def load_reward(stack: ModelStack, store: Any, config: dict[str, Any], max_new_tokens: int) -> Scorer:
    """A rule (``reward: 'rule:...'``) or the trained reward model (latest, or a version)."""
    spec = config.get("reward")
    if isinstance(spec, str) and spec.startswith("rule:"):
        return rule_scorer(spec, stack.tokenizer.eos_token_id, max_new_tokens)
    from rlhf.reward import load_scorer

    scorer = load_scorer(stack, store, spec)
    if scorer is None:
        raise UserError("no reward model: train one first (rlhf train-reward)")
    return scorer


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
    if config.get("resume"):
        resume_checkpoint(store)
    elif config.get("init_policy_version"):
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

    config = ctx.config
    ppo = PPOConfig.from_dict(config)
    if ppo.seed is not None:
        torch.manual_seed(ppo.seed)
    options = ModelOptions(source=config.get("model", "embedded"), quantize=config.get("quantize"),
                           device=config.get("device"))
    stack = load_stack(options, progress=lambda msg: print(msg, flush=True))
    start = prepare_stack(stack, ctx.store, config)
    scorer = load_reward(stack, ctx.store, config, ppo.max_new_tokens)
    session = PPOSession(stack, scorer, session_prompts(ctx.store, config), ppo, beta=start.beta)
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
        except BaseException:
            if pending and batch is not None:  # a stop keeps what was trained
                save_checkpoint(ctx, session, batch, start.iteration + done, version, start.reference_version,
                                last_metrics)
            raise
        iteration = start.iteration + done + 1
        metrics, batch = session.iteration(iteration)
        last_metrics = metrics
        done += 1
        ctx.log(iteration, metrics)
        write_rollouts(rollouts_path(ctx.checkpoint_root, ctx.job_id), batch.rows())
        pending = True
        finished = (iterations and done >= int(iterations)) or (minutes and time.monotonic() - began >= 60 * minutes)
        if done % save_every == 0 or finished:
            version = save_checkpoint(ctx, session, batch, iteration, version, start.reference_version, metrics)
            pending = False
        if finished:
            break


def save_checkpoint(ctx: Any, session: PPOSession, batch: Rollout, iteration: int, parent: int,
                    reference_version: int, metrics: dict[str, float]) -> int:
    """Save the policy adapter (with the value head) and optimizer; register it as
    the next policy version. Returns the version."""
    folder = Path(ctx.checkpoint_root) / "policy" / f"ppo-job{ctx.job_id}-iter{iteration}"
    meta = {"job_id": ctx.job_id, "iteration": iteration, "reference_version": reference_version,
            "beta": session.beta, "rollout_score": metrics["objective/scores"], "kl": metrics["objective/kl"],
            "config": asdict(session.config)}
    session.stack.save_adapter("policy", folder, meta)
    session.save_state(folder, batch)
    version = ctx.store.add_checkpoint("policy", folder, job_id=ctx.job_id, parent_version=parent, meta=meta)
    session.stack.policy_version = version
    print(f"iteration {iteration}: saved policy version {version} ({folder})", flush=True)
    return version
