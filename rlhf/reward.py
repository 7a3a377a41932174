"""The reward model: Bradley–Terry training on recorded preferences.

r_ψ(s, a) is a linear head on the shared base's hidden states a third of the way
up, averaged over the completion's tokens (EOS appended where the completion
lacks one), trained on frozen features by default — the same function at
training and at scoring. lm-human-preferences reads the last layer at EOS under
a trained adapter; with tens of labels on a 135M model that state carried
nothing of the taste and the adapter memorized the labels (RewardConfig says
what was measured), so both are options (``readout='eos'``, ``finetune``), and
versions saved before keep the read-out they were trained with (``Readout``).

Training maximizes the Bradley–Terry log-likelihood of the labels,
P(a1 ≻ a2 | s) = σ(r(s,a1) − r(s,a2)), i.e. minimizes −log σ(r_chosen − r_rejected).
A best-of-K pick uses the softmax over its K rewards by default (Ziegler et al.
2019, lm-human-preferences ``label_types.py``); a full ranking trains all its C(K,2)
pairs as one batch element (InstructGPT).

A solo researcher has tens to hundreds of comparisons, not InstructGPT's tens of
thousands, so "one epoch" is a handful of steps that learn nothing. By default
training runs epochs until the held-out loss stops improving (early stopping,
the best state kept), and held-out accuracy is reported with its count and a
95% interval over the held-out comparisons, so that "0.58 on 12 pairs" reads as
what it is. The held-out split also chooses where to stop, which makes its
accuracy slightly optimistic; ``rlhf eval-policy`` is the unbiased check of the
whole loop.

Normalization: the job maps the scores of the completions it was trained on to
mean 0, std 1 (what the labeling screen shows). A PPO session renormalizes
against its own reference (``RewardScorer.renormalize`` on its first rollout
batch), so that the scores PPO sees start at mean 0, std 1 and β keeps one
meaning across runs (lm-human-preferences ``normalize_after``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from rlhf.chat import chat_prompt_ids
from rlhf.errors import UserError
from rlhf.reward_data import SOURCES, Element, batches, completion_tokens, join_prompt, split_by_prompt, store_elements
from rlhf.stats import correlation, rate_text
from rlhf.tokens import right_pad

if TYPE_CHECKING:
    from rlhf.jobs import JobContext
    from rlhf.model_stack import ModelStack
    from rlhf.store import Store

ADAPTER = "reward"
BEST_OF_K_LOSSES = ("softmax", "pairwise")


# Settings of the two ways to train, where the config leaves them unset:
# - the head alone on the frozen base's features (the default): full-batch Adam,
#   one step an epoch, cheap enough for thousands of epochs;
# - fine-tuning the reward LoRA adapter too (``finetune``): mini-batches through
#   the model, minutes an epoch on a CPU; TRL's RewardConfig uses 1e-4 for LoRA.
PHASE_DEFAULTS = {"head": {"lr": 1e-3, "max_epochs": 2000, "patience": 50},
                  "finetune": {"lr": 1e-4, "max_epochs": 8, "patience": 2}}
POOLS = ("mean", "eos")


@dataclass
class RewardConfig:
    """How a reward model is trained. Defaults and where they come from."""

    # -- what the reward reads: a linear head on the base's hidden states after
    # `layer` decoder layers (None: a third of the depth), averaged over the
    # completion's tokens, EOS included ('mean'), or the EOS token's alone ('eos',
    # lm-human-preferences' read-out, with layer = the depth). Measured on the
    # embedded model with ~50 rule labels (a linear head on frozen features,
    # pairwise accuracy on 40 held-out prompts): the last layer's EOS state holds
    # nothing of the taste (0.50); a third of the way up, the mean holds most
    # (0.90 "more digits", 0.74 "shorter words"; the EOS state there 0.70, 0.69).
    readout: str = "mean"
    layer: int | None = None
    # -- how: the head alone on frozen features (default), or the reward LoRA
    # adapter too (`finetune`, after the head: hundreds of labels and more; fitted
    # on ~50 labels it memorized them, 0.58 held-out).
    finetune: bool = False
    # Passes over the pairs. None: chosen by the held-out loss, up to max_epochs,
    # stopping after `patience` evaluations without improvement and keeping the
    # best state. InstructGPT's "one epoch, more overfits" (sec. 3.5) holds for
    # ~50k comparisons; with 60 it is eight steps and learns nothing (measured:
    # held-out 0.58 on 12 pairs, chance). A number trains exactly that many.
    epochs: int | None = None
    max_epochs: int | None = None    # None: PHASE_DEFAULTS
    patience: int | None = None      # None: PHASE_DEFAULTS
    # Optimizer steps; None = as many as the epochs take. Set it for a fixed budget.
    steps: int | None = None
    # Adam, decaying linearly to 0 over the planned steps (lm-human-preferences).
    lr: float | None = None          # None: PHASE_DEFAULTS
    # Fine-tuning only: batch elements (comparisons) per forward pass, and passes per
    # optimizer step (gradient accumulation for small memory).
    batch_size: int = 4
    accum: int = 2
    # 'softmax': a best-of-K pick as one K-way choice, −log softmax(r)[best] (Ziegler
    # et al. 2019, the lm-human-preferences default); 'pairwise': its K−1 wins as
    # Bradley–Terry pairs. Softmax is the default: it is the likelihood of the pick
    # itself, where K−1 pairs count one decision as K−1 independent ones.
    best_of_k: str = "softmax"
    # Which pairs train: 'all', 'label' (the researcher's own) or 'import'.
    sources: str = "all"
    # Fraction of prompts held out (by prompt-text hash): a fifth, so that a few
    # dozen comparisons leave enough to stop on. Evaluated at every epoch's end
    # and every eval_every steps within a long fine-tuning epoch.
    eval_fraction: float = 0.2
    eval_every: int = 20
    # Token budget per sequence (prompt is cut from its start first) and per completion.
    max_length: int = 512
    max_completion_tokens: int = 256
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
        if self.readout not in POOLS:
            raise UserError(f"unknown --readout {self.readout!r}: use one of {', '.join(POOLS)}")
        for name in ("batch_size", "accum", "eval_every", "max_length"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("epochs", "max_epochs", "patience", "steps", "layer"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.lr is not None and self.lr <= 0:
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

    @property
    def early_stopping(self) -> bool:
        """Neither epochs nor steps fixed: the held-out loss decides."""
        return self.epochs is None and self.steps is None

    def setting(self, name: str, phase: str) -> Any:
        """lr, max_epochs or patience of a phase ('head' or 'finetune'): the config's
        own where set and where the phase is the one it configures (the last: the
        fine-tuning when there is one), else the phase's default."""
        mine = getattr(self, name)
        configured = "finetune" if self.finetune else "head"
        return mine if mine is not None and phase == configured else PHASE_DEFAULTS[phase][name]

    def readout_for(self, stack: ModelStack) -> Readout:
        return Readout(layer=min(self.layer or default_layer(stack.depth), stack.depth), pool=self.readout)


@dataclass(frozen=True)
class Readout:
    """Where the reward head reads the base: after ``layer`` decoder layers, the
    completion's tokens averaged ('mean') or its EOS token ('eos')."""

    layer: int
    pool: str = "mean"

    @classmethod
    def from_meta(cls, meta: dict[str, Any], depth: int) -> Readout:
        """A saved version's read-out; versions from before it was recorded read
        the last layer at EOS."""
        saved = meta.get("readout")
        return cls(**saved) if saved else cls(layer=depth, pool="eos")


def default_layer(depth: int) -> int:
    """A third of the way up (10 of SmolLM2-135M's 30 layers): see RewardConfig.readout."""
    return max(1, round(depth / 3))


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


# --- scoring ------------------------------------------------------------------------


def pool(hidden: torch.Tensor, last: torch.Tensor, lengths: torch.Tensor, how: str) -> torch.Tensor:
    """[B, T, H] -> [B, H]: each row's EOS state (at ``last``), or the mean over its
    completion's ``lengths`` tokens ending there (EOS included)."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if how == "eos":
        return hidden[rows, last]
    positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
    mask = ((positions <= last[:, None]) & (positions > (last - lengths)[:, None])).to(hidden.dtype)
    return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


def features(stack: ModelStack, sequences: Sequence[Sequence[int]], lengths: Sequence[int],
             readout: Readout) -> torch.Tensor:
    """What the reward head reads for each sequence (prompt + completion ending in
    EOS, ``lengths`` = completion tokens). Differentiable; runs under the active role."""
    ids, mask, last = right_pad(sequences, stack.tokenizer.pad_token_id)
    ids, mask, last = ids.to(stack.device), mask.to(stack.device), last.to(stack.device)
    hidden = stack.hidden(ids, mask, layers=readout.layer)
    return pool(hidden, last, torch.tensor(list(lengths), device=stack.device), readout.pool)


def raw_rewards(stack: ModelStack, sequences: Sequence[Sequence[int]], lengths: Sequence[int],
                readout: Readout) -> torch.Tensor:
    """r_ψ of each sequence. Differentiable; the caller picks grad or no_grad and
    must hold stack.role('reward')."""
    return stack.reward_head(features(stack, sequences, lengths, readout)).squeeze(-1)


@torch.no_grad()
def batched_features(stack: ModelStack, sequences: Sequence[Sequence[int]], lengths: Sequence[int],
                     readout: Readout, batch_size: int = 16) -> torch.Tensor:
    """``features`` of many sequences under the reward role, without gradients (CPU)."""
    out = []
    with stack.role(ADAPTER):
        for start in range(0, len(sequences), batch_size):
            chunk = slice(start, start + batch_size)
            out.append(features(stack, sequences[chunk], lengths[chunk], readout).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, stack.reward_head.in_features)


@torch.no_grad()
def score_sequences(stack: ModelStack, sequences: Sequence[Sequence[int]], lengths: Sequence[int],
                    readout: Readout, batch_size: int = 16) -> torch.Tensor:
    """Raw rewards of many sequences in batches, without gradients (CPU tensor)."""
    feats = batched_features(stack, sequences, lengths, readout, batch_size)
    return stack.reward_head(feats.to(stack.device)).squeeze(-1).float().cpu()


class RewardScorer:
    """Scores with the 'reward' adapter + reward head of a ModelStack, read as it was trained."""

    def __init__(self, stack: ModelStack, *, readout: Readout | None = None, gain: float = 1.0, bias: float = 0.0,
                 max_length: int = 512, max_completion_tokens: int = 256,
                 batch_size: int = 16, version: int | None = None) -> None:
        self.stack = stack
        self.readout = readout or Readout(layer=default_layer(stack.depth))
        self.version = version  # the store's reward version, when loaded from one
        self.gain = gain
        self.bias = bias
        self.max_length = max_length
        self.max_completion_tokens = max_completion_tokens
        self.batch_size = batch_size

    def sequences(self, prompt_ids: Sequence[Sequence[int]],
                  completion_ids: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[int]]:
        """Prompt + completion ids with exactly one EOS at the end (appended where
        missing), and each completion's length with its EOS."""
        tok = self.stack.tokenizer
        bodies = [completion_tokens(tok, "", c, max_tokens=self.max_completion_tokens) for c in completion_ids]
        return [join_prompt(p, b, self.max_length) for p, b in zip(prompt_ids, bodies)], [len(b) for b in bodies]

    def raw_ids(self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Unnormalized rewards."""
        sequences, lengths = self.sequences(prompt_ids, completion_ids)
        return score_sequences(self.stack, sequences, lengths, self.readout, self.batch_size)

    def score_ids(self, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                  finished: list[bool]) -> torch.Tensor:
        """Normalized scores gain*r + bias, read as in training (EOS appended where a
        completion has none). Whether an unfinished completion is penalized
        is PPO's setting (rlhf.ppo_math.penalize_missing_eos), not the model's."""
        return self.gain * self.raw_ids(prompt_ids, completion_ids) + self.bias

    def renormalize(self, scores: torch.Tensor) -> Normalization:
        """Fold an affine map into gain and bias so that ``scores`` (this scorer's
        scores of a sample of some policy) become mean 0, std 1. A PPO session
        calls it on its first rollout batch, a sample of its own reference."""
        norm = normalization_of(scores)
        self.gain, self.bias = norm.gain * self.gain, norm.gain * self.bias + norm.bias
        return norm

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
    scorer = RewardScorer(stack, readout=Readout.from_meta(meta, stack.depth),
                          gain=float(meta.get("gain", 1.0)), bias=float(meta.get("bias", 0.0)),
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
    loss: float = float("nan")   # the training loss on these elements (held-out loss)

    def text(self) -> str:
        """'0.58 on 12 pairs (95% CI 0.32-0.81)': accuracy with its count and interval."""
        return rate_text(self.accuracy, self.n_pairs)


class Comparisons:
    """Elements laid out over one vector of rewards, a reward per sequence, so that
    the losses and margins of all of them are a few tensor operations (the head
    trains for thousands of epochs over them)."""

    def __init__(self, elements: Sequence[Element], best_of_k: str = "softmax") -> None:
        self.elements = list(elements)
        self.sequences = [s for e in self.elements for s in e.sequences]
        if any(len(e.lengths) != len(e.sequences) for e in self.elements):
            raise ValueError("every Element needs its completion lengths, one per sequence (for the read-out)")
        self.lengths = [n for e in self.elements for n in e.lengths]
        offsets = [0]
        for e in self.elements:
            offsets.append(offsets[-1] + len(e.sequences))
        pairs = [(i, offsets[i] + c, offsets[i] + r) for i, e in enumerate(self.elements) for c, r in e.pairs]
        self.pair_element, self.chosen, self.rejected = (torch.tensor(col, dtype=torch.long) for col in
                                                         (zip(*pairs) if pairs else ([], [], [])))
        # A best-of-K pick trained as one K-way choice: (element, its sequences, the pick), by K.
        self.choices: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        groups: dict[int, list[tuple[int, list[int], int]]] = {}
        for i, e in enumerate(self.elements):
            if e.kind == "best" and best_of_k == "softmax" and len(e.pairs) > 1:
                seqs = list(range(offsets[i], offsets[i + 1]))
                groups.setdefault(len(seqs), []).append((i, seqs, e.pairs[0][0]))
        for k, rows in groups.items():
            self.choices[k] = (torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows]),
                               torch.tensor([r[2] for r in rows]))
        as_choice = torch.zeros(len(self.elements), dtype=torch.bool)
        for element_ids, _, _ in self.choices.values():
            as_choice[element_ids] = True
        self.as_pairs = ~as_choice[self.pair_element] if pairs else torch.zeros(0, dtype=torch.bool)

    def margins(self, rewards: torch.Tensor) -> torch.Tensor:
        """r_chosen − r_rejected for every pair."""
        return rewards[self.chosen] - rewards[self.rejected]

    def loss(self, rewards: torch.Tensor) -> torch.Tensor:
        """The mean over elements of ``element_loss``: a best-of-K pick's softmax
        loss, the mean Bradley–Terry loss of any other element's pairs."""
        per_element = torch.zeros(len(self.elements), dtype=rewards.dtype)
        for element_ids, seqs, best in self.choices.values():
            picked = torch.log_softmax(rewards[seqs], dim=-1).gather(1, best[:, None]).squeeze(1)
            per_element = per_element.index_put((element_ids,), -picked)
        if self.as_pairs.any():
            ids = self.pair_element[self.as_pairs]
            pair_loss = -F.logsigmoid(self.margins(rewards)[self.as_pairs])
            sums = torch.zeros_like(per_element).index_add(0, ids, pair_loss)
            counts = torch.zeros_like(per_element).index_add(0, ids, torch.ones_like(pair_loss))
            per_element = torch.where(counts > 0, sums / counts.clamp(min=1), per_element)
        return per_element.mean()

    def evaluate(self, rewards: torch.Tensor) -> PairEval:
        if not self.elements:
            return PairEval(float("nan"), float("nan"), 0)
        m = self.margins(rewards)
        return PairEval(accuracy=(m > 0).float().mean().item(), margin=m.mean().item(), n_pairs=len(m),
                        loss=self.loss(rewards).item())


@torch.no_grad()
def evaluate_elements(stack: ModelStack, elements: Sequence[Element], readout: Readout, batch_size: int = 16,
                      best_of_k: str = "softmax") -> PairEval:
    """Pairwise accuracy (r_chosen > r_rejected), mean raw margin, and the mean
    training loss of the elements."""
    layout = Comparisons(elements, best_of_k)
    rewards = score_sequences(stack, layout.sequences, layout.lengths, readout, batch_size)
    return layout.evaluate(rewards)


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
    steps: int                 # optimizer steps taken
    eval: PairEval             # held-out figures of the state kept
    n_train: int
    n_eval: int
    epochs: float = 0.0        # passes over the training elements taken (in the last phase)
    best_step: int = 0         # the step whose state was kept
    stopped_early: bool = False
    readout: Readout | None = None


# With nothing held out there is nothing to stop on: this many fine-tuning epochs
# (the head: a tenth of its most).
EPOCHS_WITHOUT_HELD_OUT = 4


def linear_decay(step: int, total: int) -> float:
    """LR multiplier: 1 at the first step, decaying linearly towards 0 (lm-human-preferences)."""
    return max(0.0, 1.0 - step / total)


def planned_epochs(config: RewardConfig, has_held_out: bool, phase: str = "finetune") -> int:
    """Epochs to plan for: the fixed number, else the most early stopping may use."""
    configured = "finetune" if config.finetune else "head"
    if phase == configured and config.epochs is not None:
        return config.epochs
    if phase == configured and config.steps is not None and phase == "head":
        return config.steps  # the head takes one step an epoch
    most = config.setting("max_epochs", phase)
    return most if has_held_out else min(most, EPOCHS_WITHOUT_HELD_OUT if phase == "finetune" else most // 10)


def steps_per_epoch(n_train: int, config: RewardConfig) -> int:
    micro = -(-n_train // config.batch_size)
    return max(1, -(-micro // config.accum))


def plan_steps(train_set: Sequence[Element], config: RewardConfig, rng: random.Random,
               epochs: int | None = None) -> list[list[list[Element]]]:
    """Fine-tuning steps, each a list of up to ``accum`` micro-batches: whole epochs,
    each shuffled and cut into batches (so one epoch shows every element exactly
    once, and no step spans two epochs); with ``steps`` set, as many epochs as that
    takes, cut to length."""
    epochs = epochs or config.epochs or config.setting("max_epochs", "finetune")
    plan: list[list[list[Element]]] = []
    done = 0
    while (len(plan) < config.steps) if config.steps else (done < epochs):
        order = list(train_set)
        rng.shuffle(order)
        micro = batches(order, config.batch_size)
        plan += [micro[i:i + config.accum] for i in range(0, len(micro), config.accum)]
        done += 1
    return plan[:config.steps] if config.steps else plan


def trainable_parameters(stack: ModelStack) -> list[torch.nn.Parameter]:
    """The reward adapter's LoRA weights and the reward head, switched to trainable."""
    stack.ensure_adapter(ADAPTER)
    params = stack.adapter_parameters(ADAPTER) + list(stack.reward_head.parameters())
    for p in params:
        p.requires_grad_(True)
    return params


class BestState:
    """Early stopping on the held-out loss: a copy of the parameters at the best
    evaluation so far, and how many evaluations since it improved."""

    def __init__(self, params: Sequence[torch.Tensor], patience: int) -> None:
        self.params, self.patience = list(params), patience
        self.eval: PairEval | None = None
        self.step = 0
        self.since_best = 0
        self._saved: list[torch.Tensor] = []

    def observe(self, step: int, result: PairEval) -> bool:
        """Record an evaluation; True when training should stop."""
        if self.eval is None or result.loss < self.eval.loss - 1e-4:
            self.eval, self.step, self.since_best = result, step, 0
            self._saved = [p.detach().clone() for p in self.params]
        else:
            self.since_best += 1
        return self.since_best >= self.patience

    @torch.no_grad()
    def restore(self) -> None:
        for p, saved in zip(self.params, self._saved):
            p.copy_(saved)


@dataclass
class Phase:
    """What one phase of training did."""

    steps: int
    epochs: float
    eval: PairEval
    best_step: int
    stopped_early: bool


def fit_head(stack: ModelStack, train: Comparisons, held_out: Comparisons, readout: Readout,
             config: RewardConfig, log: Callable[[int, dict[str, float]], None],
             checkpoint: Callable[[], None]) -> Phase:
    """The reward head alone on the features of the (frozen) base: the features
    are computed once, then every epoch is one full-batch Adam step on the head,
    standardized features in, so thousands of epochs take seconds. Early stopping
    on the held-out loss stands in for a weight penalty (gradient descent from zero
    stopped early regularizes like L2). The standardization is folded into the
    head at the end, so the saved head reads raw features."""
    x_train = batched_features(stack, train.sequences, train.lengths, readout, config.batch_size * 4)
    x_held = batched_features(stack, held_out.sequences, held_out.lengths, readout, config.batch_size * 4)
    mean, std = x_train.mean(0), x_train.std(0).clamp(min=1e-6) if len(x_train) > 1 else torch.ones(x_train.shape[1])
    z_train, z_held = (x_train - mean) / std, (x_held - mean) / std
    weight = torch.zeros(x_train.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    epochs = planned_epochs(config, bool(held_out.elements), "head")
    optimizer = torch.optim.Adam([weight, bias], lr=config.setting("lr", "head"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: linear_decay(s, epochs))
    early = config.early_stopping or config.finetune  # a head under a fine-tuning always stops early
    best = BestState([weight, bias], config.setting("patience", "head")) if early and held_out.elements else None
    result, stop, epoch = PairEval(float("nan"), float("nan"), 0), False, 0
    for epoch in range(1, epochs + 1):
        checkpoint()
        lr = scheduler.get_last_lr()[0]
        optimizer.zero_grad(set_to_none=True)
        rewards = z_train @ weight + bias
        loss = train.loss(rewards)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            margins = train.margins(rewards.detach())
            metrics = {"loss": loss.item(), "accuracy": (margins > 0).float().mean().item(),
                       "margin": margins.mean().item(), "lr": lr, "epoch": float(epoch)}
            if held_out.elements:
                result = held_out.evaluate(z_held @ weight + bias)
                metrics.update({"eval/accuracy": result.accuracy, "eval/margin": result.margin,
                                "eval/loss": result.loss})
                stop = best is not None and best.observe(epoch, result)
        log(epoch, metrics)
        if stop:
            break
    kept = epoch
    if best is not None and best.eval is not None:
        best.restore()
        result, kept = best.eval, best.step
    with torch.no_grad():
        head = stack.reward_head
        w = (weight / std).to(head.weight)
        head.weight.copy_(w[None])
        head.bias.copy_((bias - (w.cpu() * mean).sum()).to(head.bias))
    return Phase(steps=epoch, epochs=float(epoch), eval=result, best_step=kept, stopped_early=stop)


def finetune_step(stack: ModelStack, optimizer: torch.optim.Optimizer, micro_batches: Sequence[Sequence[Element]],
                  readout: Readout, best_of_k: str, checkpoint: Callable[[], None]) -> dict[str, float]:
    """One optimizer step of the adapter and head over accumulated micro-batches."""
    optimizer.zero_grad(set_to_none=True)
    losses, margins = [], []
    for batch in micro_batches:
        checkpoint()
        layout = Comparisons(batch, best_of_k)
        with stack.role(ADAPTER):
            rewards = raw_rewards(stack, layout.sequences, layout.lengths, readout)
        loss = layout.loss(rewards.float().cpu())
        (loss / len(micro_batches)).backward()  # gradient accumulation: the mean over micro-batches
        losses.append(loss.item())
        margins.append(layout.margins(rewards.detach().float().cpu()))
    optimizer.step()
    m = torch.cat(margins)
    return {"loss": sum(losses) / len(losses), "accuracy": (m > 0).float().mean().item(), "margin": m.mean().item()}


def finetune(stack: ModelStack, train_set: Sequence[Element], held_out: Sequence[Element], readout: Readout,
             config: RewardConfig, head: Phase, log: Callable[[int, dict[str, float]], None],
             checkpoint: Callable[[], None], first_step: int) -> Phase:
    """The reward LoRA adapter and the head together, from the fitted head, in
    mini-batches through the model; early stopping counts the head's held-out
    loss as the one to beat, so fine-tuning that does not help changes nothing."""
    plan = plan_steps(train_set, config, random.Random(config.seed),
                      planned_epochs(config, bool(held_out), "finetune"))
    per_epoch = steps_per_epoch(len(train_set), config)
    steps = len(plan)
    params = trainable_parameters(stack)
    optimizer = torch.optim.Adam(params, lr=config.setting("lr", "finetune"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: linear_decay(s, steps))
    best = BestState(params, config.setting("patience", "finetune")) if config.early_stopping and held_out else None
    if best is not None:
        best.observe(first_step - 1, head.eval)
    result, stop, taken = head.eval, False, 0
    try:
        for step, micro_batches in enumerate(plan, start=1):
            lr = scheduler.get_last_lr()[0]
            metrics = {**finetune_step(stack, optimizer, micro_batches, readout, config.best_of_k, checkpoint),
                       "lr": lr}
            scheduler.step()
            taken = step
            epoch_end = step % per_epoch == 0 or step == steps
            if held_out and (epoch_end or step % config.eval_every == 0):
                result = evaluate_elements(stack, held_out, readout, config.batch_size * 4, config.best_of_k)
                metrics.update({"eval/accuracy": result.accuracy, "eval/margin": result.margin,
                                "eval/loss": result.loss})
                stop = best is not None and best.observe(first_step + step - 1, result)
            if epoch_end:
                metrics["epoch"] = step / per_epoch
            log(first_step + step - 1, metrics)
            if stop:
                break
    finally:
        for p in params:
            p.requires_grad_(False)
    kept = first_step + taken - 1
    if best is not None and best.eval is not None:
        best.restore()
        result, kept = best.eval, best.step
    return Phase(steps=taken, epochs=taken / per_epoch, eval=result, best_step=kept, stopped_early=stop)


def train(stack: ModelStack, elements: Sequence[Element], config: RewardConfig, *,
          log: Callable[[int, dict[str, float]], None] = lambda step, metrics: None,
          checkpoint: Callable[[], None] = lambda: None,
          set_total: Callable[[int], None] = lambda n: None) -> TrainResult:
    """Train the reward model with Bradley–Terry on ``elements``: the head on the
    frozen base's features, then (``finetune``) the reward adapter with it.

    ``log(step, metrics)`` gets loss, accuracy, margin, lr every step (a head
    epoch is a step); eval/accuracy, eval/margin, eval/loss at every evaluation;
    epoch at every epoch's end. Without a fixed number of epochs or steps,
    training stops once the held-out loss has not improved for ``patience``
    evaluations, and keeps the best state. ``checkpoint()`` runs between steps
    (cancel / pause)."""
    train_set, held_out = split_by_prompt(elements, config.eval_fraction)
    if not train_set:
        raise UserError("no preference pairs to train on: label some comparisons or `rlhf import` a file")
    readout = config.readout_for(stack)
    torch.manual_seed(config.seed)
    stack.ensure_adapter(ADAPTER)
    head_epochs = planned_epochs(config, bool(held_out), "head")
    tuning_steps = (len(plan_steps(train_set, config, random.Random(config.seed),
                                   planned_epochs(config, bool(held_out), "finetune")))
                    if config.finetune else 0)
    set_total(head_epochs + tuning_steps)
    head = fit_head(stack, Comparisons(train_set, config.best_of_k), Comparisons(held_out, config.best_of_k),
                    readout, config, log, checkpoint)
    last = head
    if config.finetune:
        last = finetune(stack, train_set, held_out, readout, config, head, log, checkpoint, head.steps + 1)
    return TrainResult(steps=head.steps + (last.steps if last is not head else 0), eval=last.eval,
                       n_train=len(train_set), n_eval=len(held_out), epochs=last.epochs,
                       best_step=last.best_step, stopped_early=last.stopped_early, readout=readout)


# --- normalization and the length check ------------------------------------------------


@dataclass
class Normalization:
    gain: float
    bias: float
    raw_mean: float
    raw_std: float
    n_samples: int


def normalization_of(scores: torch.Tensor) -> Normalization:
    """Gain and bias that map ``scores`` to mean 0, std 1 (a constant sample keeps
    gain 1: there is no spread to scale)."""
    mean = scores.float().mean().item()
    std = scores.float().std().item() if len(scores) > 1 else 0.0
    gain = 1.0 / std if std > 1e-8 else 1.0
    return Normalization(gain=gain, bias=-gain * mean, raw_mean=mean, raw_std=std, n_samples=len(scores))


def completion_scores(stack: ModelStack, elements: Sequence[Element], readout: Readout,
                      batch_size: int = 16) -> tuple[torch.Tensor, list[int]]:
    """Raw scores and token lengths of every distinct completion in ``elements``."""
    lengths: dict[tuple[int, ...], int] = {}
    for e in elements:
        for seq, n in zip(e.sequences, e.lengths):
            lengths.setdefault(tuple(seq), n)
    counts = list(lengths.values())
    return score_sequences(stack, [list(s) for s in lengths], counts, readout, batch_size), counts


def labels_prefer_longer(elements: Sequence[Element]) -> tuple[float | None, int]:
    """How often the labels chose the longer completion, over pairs of unequal
    length: (fraction, pairs counted). Far from 0.5, the taste itself is about
    length, and a reward model will learn length first (Singhal et al. 2023)."""
    longer = decided = 0
    for e in elements:
        for c, r in e.pairs:
            if e.lengths[c] != e.lengths[r]:
                decided += 1
                longer += e.lengths[c] > e.lengths[r]
    return (longer / decided if decided else None), decided


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
    readout = result.readout or config.readout_for(stack)
    completion_ids = [i for e in elements for i in e.completion_ids]
    meta = {"eval_accuracy": result.eval.accuracy, "eval_margin": result.eval.margin,
            "eval_pairs": result.eval.n_pairs, "eval_loss": result.eval.loss, "eval_elements": result.n_eval,
            "train_elements": result.n_train, "steps": result.steps, "epochs": result.epochs,
            "best_step": result.best_step, "stopped_early": result.stopped_early, "readout": asdict(readout),
            "finetuned": config.finetune, "sampling": ctx.store.sampling_definition(completion_ids),
            "seconds": time.monotonic() - started, "sources": config.sources, "max_length": config.max_length,
            "max_completion_tokens": config.max_completion_tokens, "config": config.to_dict()}
    # Saved before anything else can fail: what training cost is never lost.
    # Until the normalization below is recorded, the version scores with gain 1,
    # bias 0; a PPO session renormalizes on its own reference anyway.
    path = ctx.checkpoint_root / f"reward-job-{ctx.job_id}"
    stack.save_adapter(ADAPTER, path, meta=meta)
    version = ctx.store.add_checkpoint("reward", path, job_id=ctx.job_id, meta=meta)
    print(f"saved reward version {version} to {path}")
    # Normalized on the completions it was trained on (no sampling), with the
    # length check: one more scoring pass over them.
    raw, lengths = completion_scores(stack, elements, readout, batch_size=config.batch_size * 4)
    norm = normalization_of(raw)
    longer, decided = labels_prefer_longer(elements)
    meta.update({"gain": norm.gain, "bias": norm.bias, "raw_mean": norm.raw_mean, "raw_std": norm.raw_std,
                 "norm_samples": norm.n_samples, "length_corr": correlation(raw.tolist(), lengths),
                 "labels_prefer_longer": longer, "length_pairs": decided})
    ctx.store.update_checkpoint_meta("reward", version, meta)
