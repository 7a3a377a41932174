"""The reward model: Bradley–Terry training on recorded preferences, scoring at EOS.

r_ψ(s, a) is a scalar head on the last hidden state of the shared base under the
``reward`` LoRA adapter, read at the completion's EOS token (appended where the
completion lacks one) — the same function at training and at scoring
(lm-human-preferences, "N implementation details of RLHF").

Training maximizes the Bradley–Terry log-likelihood of the labels,
P(a1 ≻ a2 | s) = σ(r(s,a1) − r(s,a2)), i.e. minimizes −log σ(r_chosen − r_rejected).
A best-of-K pick uses the softmax over its K rewards by default (Ziegler et al.
2019, lm-human-preferences ``label_types.py``); a full ranking trains all its C(K,2)
pairs as one batch element (InstructGPT). After training the model is normalized
so that the reference policy's samples score mean 0, std 1, which keeps β's
meaning the same across runs (lm-human-preferences ``normalize_after``).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from rlhf.errors import UserError
from rlhf.reward_data import (SOURCES, Element, batches, completion_tokens, join_prompt, right_pad, split_by_prompt,
                              store_elements)
from rlhf.sampling import SamplingParams, chat_prompt_ids, sample_k

if TYPE_CHECKING:
    from rlhf.jobs import JobContext
    from rlhf.models import ModelStack
    from rlhf.store import Store

ADAPTER = "reward"
BEST_OF_K_LOSSES = ("softmax", "pairwise")


@dataclass
class RewardConfig:
    """How a reward model is trained. Defaults and where they come from."""

    # One pass over the pairs: more epochs overfit (InstructGPT sec. 3.5; Ziegler et al. 2019).
    epochs: int = 1
    # Optimizer steps; None = as many as ``epochs`` passes take. Set it for a fixed budget.
    steps: int | None = None
    # Adam on LoRA + head. TRL's RewardConfig uses 1e-4 for LoRA reward models
    # (lm-human-preferences used 5e-5 for full fine-tuning); decays linearly to 0
    # as in lm-human-preferences.
    lr: float = 1e-4
    # Batch elements (comparisons) per forward pass, and passes per optimizer step:
    # the effective batch is batch_size * accum (gradient accumulation for small memory).
    batch_size: int = 4
    accum: int = 2
    # 'softmax': a best-of-K pick as one K-way choice, −log softmax(r)[best] (Ziegler
    # et al. 2019, the lm-human-preferences default); 'pairwise': its K−1 wins as
    # Bradley–Terry pairs. Softmax is the default: it is the likelihood of the pick
    # itself, where K−1 pairs count one decision as K−1 independent ones.
    best_of_k: str = "softmax"
    # Which pairs train: 'all', 'label' (the researcher's own) or 'import'.
    sources: str = "all"
    # Fraction of prompts held out (by prompt-text hash), and how often to evaluate them.
    eval_fraction: float = 0.1
    eval_every: int = 20
    # Token budget per sequence (prompt is cut from its start first) and per completion.
    max_length: int = 512
    max_completion_tokens: int = 256
    # Normalization: reference samples scored after training (lm-human-preferences
    # used 256; fewer here because a CPU samples slowly), to mean 0, std 1; drawn
    # from up to norm_prompts of the store's prompts, K per prompt to make up the count.
    norm_samples: int = 64
    norm_max_new_tokens: int = 48
    norm_prompts: int = 32
    target_mean: float = 0.0
    target_std: float = 1.0
    seed: int = 0
    # The base model (rlhf.models.ModelOptions): 'embedded', a directory or a .gguf.
    model: str = "embedded"
    quantize: bool | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        if self.sources not in SOURCES:
            raise UserError(f"unknown --sources {self.sources!r}: use one of {', '.join(SOURCES)}")
        if self.best_of_k not in BEST_OF_K_LOSSES:
            raise UserError(f"unknown best_of_k loss {self.best_of_k!r}: use one of {', '.join(BEST_OF_K_LOSSES)}")
        for name in ("epochs", "batch_size", "accum", "eval_every", "max_length"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise UserError(f"--steps must be at least 1, got {self.steps}")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.eval_fraction < 1:
            raise UserError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RewardConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown reward config field(s) {', '.join(unknown)}: "
                            f"known are {', '.join(sorted(known))}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- the loss, one function per label type ------------------------------------------


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean −log σ(r_chosen − r_rejected) over pairs (TRL's RewardTrainer computes the same)."""
    return -F.logsigmoid(chosen - rejected).mean()


def best_of_k_loss(rewards: torch.Tensor, best: int) -> torch.Tensor:
    """−log softmax(r)[best]: the pick as one choice among K (Ziegler et al. 2019)."""
    return -torch.log_softmax(rewards, dim=-1)[best]


def element_loss(rewards: torch.Tensor, element: Element, best_of_k: str) -> torch.Tensor:
    """The loss of one comparison given the rewards of its completions. A ranking's
    pairs are averaged, so a prompt weighs the same whatever its K (InstructGPT)."""
    if element.kind == "best" and best_of_k == "softmax" and len(element.pairs) > 1:
        return best_of_k_loss(rewards, element.pairs[0][0])
    chosen = rewards[[c for c, _ in element.pairs]]
    rejected = rewards[[r for _, r in element.pairs]]
    return bradley_terry_loss(chosen, rejected)


def pair_margins(rewards: torch.Tensor, element: Element) -> torch.Tensor:
    """r_chosen − r_rejected for every pair of one element."""
    return torch.stack([rewards[c] - rewards[r] for c, r in element.pairs])


# --- scoring at EOS -----------------------------------------------------------------


def raw_rewards(stack: ModelStack, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
    """r_ψ of each sequence (which must end in EOS), read at its last token.
    Differentiable; the caller picks grad or no_grad and must hold stack.role('reward')."""
    ids, mask, last = right_pad(sequences, stack.tokenizer.pad_token_id)
    ids, mask, last = ids.to(stack.device), mask.to(stack.device), last.to(stack.device)
    hidden = stack.hidden(ids, mask)
    at_eos = hidden[torch.arange(len(sequences), device=stack.device), last]
    return stack.reward_head(at_eos).squeeze(-1)


@torch.no_grad()
def score_sequences(stack: ModelStack, sequences: Sequence[Sequence[int]], batch_size: int = 16) -> torch.Tensor:
    """Raw rewards of many sequences in batches, without gradients (CPU tensor)."""
    out = []
    with stack.role(ADAPTER):
        for start in range(0, len(sequences), batch_size):
            out.append(raw_rewards(stack, sequences[start:start + batch_size]).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


class RewardScorer:
    """Scores with the 'reward' adapter + reward head of a ModelStack, at the EOS token."""

    def __init__(self, stack: ModelStack, *, gain: float = 1.0, bias: float = 0.0,
                 no_eos_penalty: float = -1.0, max_length: int = 512, max_completion_tokens: int = 256,
                 batch_size: int = 16, version: int | None = None) -> None:
        self.stack = stack
        self.version = version  # the store's reward version, when loaded from one
        self.gain = gain
        self.bias = bias
        self.no_eos_penalty = no_eos_penalty
        self.max_length = max_length
        self.max_completion_tokens = max_completion_tokens
        self.batch_size = batch_size

    def sequences(self, prompt_ids: Sequence[Sequence[int]],
                  completion_ids: Sequence[Sequence[int]]) -> list[list[int]]:
        """Prompt + completion ids with exactly one EOS at the end (appended where missing)."""
        tok = self.stack.tokenizer
        return [join_prompt(p, completion_tokens(tok, "", c, max_tokens=self.max_completion_tokens), self.max_length)
                for p, c in zip(prompt_ids, completion_ids)]

    def raw_ids(self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Unnormalized rewards."""
        return score_sequences(self.stack, self.sequences(prompt_ids, completion_ids), self.batch_size)

    def score_ids(self, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                  finished: list[bool]) -> torch.Tensor:
        """Normalized scores gain*r + bias; a completion that never emitted EOS gets
        ``no_eos_penalty`` instead (lm-human-preferences used −1)."""
        scores = self.gain * self.raw_ids(prompt_ids, completion_ids) + self.bias
        done = torch.tensor(list(finished), dtype=torch.bool)
        return torch.where(done, scores, torch.full_like(scores, self.no_eos_penalty))

    def score_texts(self, prompt: str, completions: list[str]) -> list[float]:
        """Normalized scores of completion texts for one prompt (texts count as finished)."""
        tok = self.stack.tokenizer
        prompt_ids = chat_prompt_ids(tok, prompt)
        ids = [tok(c, add_special_tokens=False)["input_ids"] for c in completions]
        return self.score_ids([prompt_ids] * len(ids), ids, [True] * len(ids)).tolist()

    def score_completions(self, prompt: str, completions: Sequence[Any],
                          cache: dict[int, float] | None = None) -> list[float]:
        """Normalized scores of store completions as the model was trained to read
        them: sampled ids when kept, else the text, EOS appended where missing (no
        penalty for a cut completion: this is the model's opinion, shown to the
        labeler and compared with labels). ``cache`` maps completion id -> score."""
        cache = {} if cache is None else cache
        todo = [c for c in completions if c.id not in cache]
        if todo:
            tok = self.stack.tokenizer
            prompt_ids = chat_prompt_ids(tok, prompt)
            ids = [c.token_ids or tok(c.text, add_special_tokens=False)["input_ids"] for c in todo]
            values = self.score_ids([prompt_ids] * len(ids), ids, [True] * len(ids)).tolist()
            cache.update(zip((c.id for c in todo), values))
        return [cache[c.id] for c in completions]


def load_scorer(stack: ModelStack, store: Store, version: int | None = None) -> RewardScorer | None:
    """The latest (or a named) reward checkpoint loaded into the stack; None if none."""
    checkpoint = store.checkpoint("reward", version)
    if checkpoint is None:
        return None
    meta = {**stack.load_adapter(ADAPTER, checkpoint["path"]), **checkpoint["meta"]}
    scorer = RewardScorer(stack, gain=float(meta.get("gain", 1.0)), bias=float(meta.get("bias", 0.0)),
                          max_length=int(meta.get("max_length", 512)),
                          max_completion_tokens=int(meta.get("max_completion_tokens", 256)),
                          version=checkpoint["version"])
    return scorer


# --- evaluation -----------------------------------------------------------------------


@dataclass
class PairEval:
    accuracy: float
    margin: float
    n_pairs: int


@torch.no_grad()
def evaluate_elements(stack: ModelStack, elements: Sequence[Element], batch_size: int = 8) -> PairEval:
    """Pairwise accuracy (r_chosen > r_rejected) and mean raw margin."""
    margins = []
    with stack.role(ADAPTER):
        for batch in batches(elements, batch_size):
            rewards = raw_rewards(stack, [s for e in batch for s in e.sequences]).float()
            offset = 0
            for e in batch:
                margins.append(pair_margins(rewards[offset:offset + len(e.sequences)], e))
                offset += len(e.sequences)
    if not margins:
        return PairEval(float("nan"), float("nan"), 0)
    m = torch.cat(margins)
    return PairEval(accuracy=(m > 0).float().mean().item(), margin=m.mean().item(), n_pairs=len(m))


def evaluate_texts(scorer: RewardScorer, pairs: Sequence[Any]) -> PairEval:
    """Accuracy and mean normalized margin on (prompt, chosen, rejected) text pairs,
    e.g. a public preference file read without importing it."""
    tok = scorer.stack.tokenizer
    margins = []
    for start in range(0, len(pairs), scorer.batch_size // 2 or 1):
        chunk = pairs[start:start + (scorer.batch_size // 2 or 1)]
        prompts = [chat_prompt_ids(tok, p.prompt) for p in chunk]
        ids = [tok(t, add_special_tokens=False)["input_ids"] for p in chunk for t in (p.chosen, p.rejected)]
        raw = scorer.raw_ids([q for q in prompts for _ in range(2)], ids)
        margins.append(scorer.gain * (raw[0::2] - raw[1::2]))
    if not margins:
        return PairEval(float("nan"), float("nan"), 0)
    m = torch.cat(margins)
    return PairEval(accuracy=(m > 0).float().mean().item(), margin=m.mean().item(), n_pairs=len(m))


@dataclass
class LabeledPairScore:
    """One labeled pair as the reward model sees it."""

    pair_id: int
    comparison_id: int | None
    prompt: str
    chosen: str
    rejected: str
    chosen_score: float
    rejected_score: float

    @property
    def margin(self) -> float:
        return self.chosen_score - self.rejected_score


def score_labeled_pairs(scorer: RewardScorer, store: Store, source: str = "label",
                        cache: dict[int, float] | None = None) -> list[LabeledPairScore]:
    """Every pair of ``source`` with both normalized scores; each completion is
    scored once (and not again when ``cache`` already holds it)."""
    cache = {} if cache is None else cache
    rows = store.pairs(source=source)
    ids = sorted({i for r in rows for i in (r["chosen_id"], r["rejected_id"])})
    completions = {c.id: c for c in store.completions(ids)}
    by_prompt: dict[str, dict[int, Any]] = {}
    for r in rows:
        for i in (r["chosen_id"], r["rejected_id"]):
            by_prompt.setdefault(r["prompt"], {})[i] = completions[i]
    for prompt, group in by_prompt.items():
        scorer.score_completions(prompt, list(group.values()), cache)
    return [LabeledPairScore(r["pair_id"], r["comparison_id"], r["prompt"], r["chosen"], r["rejected"],
                             cache[r["chosen_id"]], cache[r["rejected_id"]]) for r in rows]


def agreement(scored: Sequence[LabeledPairScore]) -> float | None:
    """How often the reward model ranks a labeled pair as the labeler did."""
    return sum(s.margin > 0 for s in scored) / len(scored) if scored else None


def disagreements(scored: Sequence[LabeledPairScore]) -> list[LabeledPairScore]:
    """Pairs the reward model gets wrong, worst (most confidently wrong) first."""
    return sorted((s for s in scored if s.margin <= 0), key=lambda s: s.margin)


# --- training ------------------------------------------------------------------------


@dataclass
class TrainResult:
    steps: int
    eval: PairEval
    n_train: int
    n_eval: int


def linear_decay(step: int, total: int) -> float:
    """LR multiplier: 1 at the first step, decaying linearly towards 0 (lm-human-preferences)."""
    return max(0.0, 1.0 - step / total)


def plan_steps(train_set: Sequence[Element], config: RewardConfig, rng: random.Random) -> list[list[list[Element]]]:
    """Optimizer steps, each a list of up to ``accum`` micro-batches: whole epochs,
    each shuffled and cut into batches (so one epoch shows every element exactly
    once); with ``steps`` set, as many epochs as that takes, cut to length."""
    wanted = config.steps * config.accum if config.steps else None
    micro: list[list[Element]] = []
    epochs = 0
    while (len(micro) < wanted) if wanted is not None else (epochs < config.epochs):
        order = list(train_set)
        rng.shuffle(order)
        micro += batches(order, config.batch_size)
        epochs += 1
    micro = micro[:wanted] if wanted is not None else micro
    return [micro[i:i + config.accum] for i in range(0, len(micro), config.accum)]


def trainable_parameters(stack: ModelStack) -> list[torch.nn.Parameter]:
    """The reward adapter's LoRA weights and the reward head, switched to trainable."""
    stack.ensure_adapter(ADAPTER)
    params = stack.adapter_parameters(ADAPTER) + list(stack.reward_head.parameters())
    for p in params:
        p.requires_grad_(True)
    return params


def train(stack: ModelStack, elements: Sequence[Element], config: RewardConfig, *,
          log: Callable[[int, dict[str, float]], None] = lambda step, metrics: None,
          checkpoint: Callable[[], None] = lambda: None,
          set_total: Callable[[int], None] = lambda n: None) -> TrainResult:
    """Train the reward adapter and head with Bradley–Terry on ``elements``.

    ``log(step, metrics)`` gets loss, accuracy, margin, lr every step and
    eval/accuracy, eval/margin every ``eval_every`` steps and at the end;
    ``checkpoint()`` runs between forward passes (cancel / pause)."""
    train_set, held_out = split_by_prompt(elements, config.eval_fraction)
    if not train_set:
        raise UserError("no preference pairs to train on: label some comparisons or `rlhf import` a file")
    plan = plan_steps(train_set, config, random.Random(config.seed))
    steps = len(plan)
    set_total(steps)
    torch.manual_seed(config.seed)
    params = trainable_parameters(stack)
    optimizer = torch.optim.Adam(params, lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: linear_decay(s, steps))

    result = PairEval(float("nan"), float("nan"), 0)
    try:
        for step, micro_batches in enumerate(plan, start=1):
            optimizer.zero_grad(set_to_none=True)
            losses, margins = [], []
            for batch in micro_batches:
                checkpoint()
                with stack.role(ADAPTER):
                    rewards = raw_rewards(stack, [s for e in batch for s in e.sequences])
                offset, batch_losses = 0, []
                for e in batch:
                    r = rewards[offset:offset + len(e.sequences)]
                    offset += len(e.sequences)
                    batch_losses.append(element_loss(r, e, config.best_of_k))
                    margins.append(pair_margins(r.detach(), e))
                loss = torch.stack(batch_losses).mean()
                (loss / len(micro_batches)).backward()  # gradient accumulation: the mean over micro-batches
                losses.append(loss.item())
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            m = torch.cat(margins)
            metrics = {"loss": sum(losses) / len(losses), "accuracy": (m > 0).float().mean().item(),
                       "margin": m.mean().item(), "lr": lr}
            if held_out and (step % config.eval_every == 0 or step == steps):
                result = evaluate_elements(stack, held_out, config.batch_size)
                metrics.update({"eval/accuracy": result.accuracy, "eval/margin": result.margin})
            log(step, metrics)
    finally:
        for p in params:
            p.requires_grad_(False)
    return TrainResult(steps=steps, eval=result, n_train=len(train_set), n_eval=len(held_out))


# --- normalization --------------------------------------------------------------------


@dataclass
class Normalization:
    gain: float
    bias: float
    raw_mean: float
    raw_std: float
    n_samples: int


def normalization_prompts(store: Store, limit: int) -> list[str]:
    """A fixed spread of the store's prompts (by text hash, so the same on every run)."""
    from rlhf.reward_data import prompt_bucket

    return sorted((p.text for p in store.prompts()), key=prompt_bucket)[:limit]


def normalize(stack: ModelStack, prompts: Sequence[str], config: RewardConfig,
              checkpoint: Callable[[], None] = lambda: None) -> Normalization:
    """Gain and bias that give the reference policy's samples mean ``target_mean``
    and std ``target_std`` (lm-human-preferences normalizes after training, so that
    β means the same across reward models). Samples are drawn the way the policy
    samples by default (rlhf.sampling.SamplingParams), so PPO starts from mean 0."""
    if not prompts:
        raise UserError("no prompts to sample for reward normalization: add prompts with `rlhf prompts add FILE`")
    prompts = list(prompts)[:config.norm_samples]
    k = max(1, math.ceil(config.norm_samples / len(prompts)))
    params = SamplingParams(max_new_tokens=config.norm_max_new_tokens)
    torch.manual_seed(config.seed)
    tok = stack.tokenizer
    sequences = []
    per_call = max(1, params.batch_size // k)
    for start in range(0, len(prompts), per_call):  # cancel is honoured between generate calls
        checkpoint()
        chunk = prompts[start:start + per_call]
        for prompt, group in zip(chunk, sample_k(stack, chunk, k, params, role="reference")):
            sequences += [join_prompt(chat_prompt_ids(tok, prompt),
                                      completion_tokens(tok, s.text, s.token_ids,
                                                        max_tokens=config.max_completion_tokens),
                                      config.max_length) for s in group]
    raw = score_sequences(stack, sequences, batch_size=config.batch_size * 2)
    mean = raw.mean().item()
    std = raw.std().item() if len(raw) > 1 else 0.0
    gain = config.target_std / std if std > 1e-8 else 1.0
    return Normalization(gain=gain, bias=config.target_mean - gain * mean, raw_mean=mean, raw_std=std,
                         n_samples=len(raw))


# --- the background job -----------------------------------------------------------------


def check_pairs(store: Store, sources: str) -> int:
    """Refuse, before a process loads a model, to train on no pairs. Returns the count."""
    n = len(store.pairs(source=None if sources == "all" else sources))
    if n == 0:
        which = {"all": "", "label": "labeled ", "import": "imported "}[sources]
        raise UserError(f"no {which}preference pairs to train on: label some comparisons in the workbench "
                        "or `rlhf import FILE`")
    return n


def run_job(ctx: JobContext) -> None:
    """The 'reward' runner of rlhf.jobs: train, normalize, save a new reward version.
    Only reads pairs: a job that fails leaves every label as it was."""
    from rlhf.models import ModelOptions, load_stack

    config = RewardConfig.from_dict(ctx.config)
    stack = load_stack(ModelOptions(source=config.model, quantize=config.quantize, device=config.device),
                       progress=print)
    elements = store_elements(ctx.store, stack.tokenizer, sources=config.sources, max_length=config.max_length,
                              max_completion_tokens=config.max_completion_tokens)
    started = time.monotonic()
    result = train(stack, elements, config, log=ctx.log, checkpoint=ctx.checkpoint, set_total=ctx.set_total)
    norm = normalize(stack, normalization_prompts(ctx.store, config.norm_prompts), config, ctx.checkpoint)
    meta = {"gain": norm.gain, "bias": norm.bias, "raw_mean": norm.raw_mean, "raw_std": norm.raw_std,
            "norm_samples": norm.n_samples, "eval_accuracy": result.eval.accuracy,
            "eval_margin": result.eval.margin, "eval_pairs": result.eval.n_pairs, "train_elements": result.n_train,
            "steps": result.steps, "seconds": time.monotonic() - started, "sources": config.sources,
            "max_length": config.max_length, "max_completion_tokens": config.max_completion_tokens,
            "config": config.to_dict()}
    path = ctx.checkpoint_root / f"reward-job-{ctx.job_id}"
    stack.save_adapter(ADAPTER, path, meta=meta)
    version = ctx.store.add_checkpoint("reward", path, job_id=ctx.job_id, meta=meta)
    print(f"saved reward version {version} to {path}")
