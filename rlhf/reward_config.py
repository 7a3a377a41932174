"""How a reward model is trained and where it reads the base: ``RewardConfig``
(the settings of a 'reward' job) and ``Readout``.

r_ψ(s, a) is a linear head on the shared base's hidden states a third of the way
up, averaged over the completion's tokens (EOS appended where the completion
lacks one), trained on frozen features by default — the same function at
training and at scoring. lm-human-preferences reads the last layer at EOS under
a trained adapter; with tens of labels on a 135M model that state carried
nothing of the taste and the adapter memorized the labels (RewardConfig says
what was measured), so both are options (``readout='eos'``, ``finetune``), and
versions saved before keep the read-out they were trained with (``Readout``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

from rlhf.config_fields import from_dict, known, setting
from rlhf.errors import UserError
from rlhf.model_options import ModelOptions

if TYPE_CHECKING:
    from rlhf.model_stack import ModelStack

# Which pairs train: the researcher's own labels, imported pairs, or all.
Sources = Literal["all", "label", "import"]
SOURCES: tuple[str, ...] = get_args(Sources)

# Settings of the two ways to train, where the config leaves them unset:
# - the head alone on the frozen base's features (the default): full-batch Adam,
#   one step an epoch, cheap enough for thousands of epochs;
# - fine-tuning the reward LoRA adapter too (``finetune``): mini-batches through
#   the model, minutes an epoch on a CPU; TRL's RewardConfig uses 1e-4 for LoRA.
PHASE_DEFAULTS = {"head": {"lr": 1e-3, "max_epochs": 2000, "patience": 50},
                  "finetune": {"lr": 1e-4, "max_epochs": 8, "patience": 2}}
Pool = Literal["mean", "eos"]
POOLS: tuple[str, ...] = get_args(Pool)
BestOfKLoss = Literal["softmax", "pairwise"]
BEST_OF_K_LOSSES: tuple[str, ...] = get_args(BestOfKLoss)


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
    readout: Pool = setting("mean", help="what the head reads: the completion's hidden states averaged, or its "
                                          "EOS token's")
    layer: int | None = setting(None, help="read after this many decoder layers (default: a third of the depth)")
    # -- how: the head alone on frozen features (default), or the reward LoRA
    # adapter too (`finetune`, after the head: hundreds of labels and more; fitted
    # on ~50 labels it memorized them, 0.58 held-out).
    finetune: bool = setting(False, help="also train the reward LoRA adapter, after the head (slow on a CPU; for "
                                         "hundreds of labels and more: on tens it memorizes them)")
    # -- the head alone: an ensemble of heads, each trained on a bootstrap resample
    # of the labeled prompts and stopped early on the prompts it left out (its
    # out-of-bag ones); the reward is their mean, their spread its uncertainty, and
    # the held-out figure is out-of-bag (each pair judged by the heads that never
    # saw its prompt). Every label trains, none is set aside. Measured against one
    # head stopped on a held-out fifth (the loop benchmark's 60 rule labels, pairwise
    # agreement with the rule on 531-600 pairs of held-out prompts' answers, the
    # reference's and the trained policy's): 0.840 -> 0.880 "more digits",
    # 0.780 -> 0.814 "you/your". 1: one head and the held-out split, as with --finetune.
    ensemble: int = setting(8, help="reward heads trained on bootstrap resamples of the labeled prompts; their mean "
                                    "is the reward, their spread its uncertainty (1: a single head; --finetune "
                                    "trains one)")
    # Passes over the pairs. None: chosen by the held-out loss, up to max_epochs,
    # stopping after `patience` evaluations without improvement and keeping the
    # best state. InstructGPT's "one epoch, more overfits" (sec. 3.5) holds for
    # ~50k comparisons; with 60 it is eight steps and learns nothing (measured:
    # held-out 0.58 on 12 pairs, chance). A number trains exactly that many.
    epochs: int | None = setting(None, help="exactly this many passes over the pairs (default: as many as the "
                                            "held-out loss improves, up to --max-epochs)")
    max_epochs: int | None = setting(None, help="most epochs early stopping may use (default 2000 head epochs, "
                                                "one step each; 8 with --finetune)")
    patience: int | None = setting(None, help="stop after this many held-out evaluations without a better loss "
                                              "(default 50; 2 with --finetune)")
    # Optimizer steps; None = as many as the epochs take. Set it for a fixed budget.
    steps: int | None = setting(None, help="exactly this many optimizer steps")
    # Adam, decaying linearly to 0 over the planned steps (lm-human-preferences).
    lr: float | None = setting(None, help="Adam learning rate, decaying linearly to 0 (default 1e-3; 1e-4 with "
                                          "--finetune)")
    # Fine-tuning only: batch elements (comparisons) per forward pass, and passes per
    # optimizer step (gradient accumulation for small memory).
    batch_size: int = setting(4, help="--finetune: comparisons per forward pass")
    accum: int = setting(2, help="--finetune: forward passes per optimizer step")
    # 'softmax': a best-of-K pick as one K-way choice, −log softmax(r)[best] (Ziegler
    # et al. 2019, the lm-human-preferences default); 'pairwise': its K−1 wins as
    # Bradley–Terry pairs. Softmax is the default: it is the likelihood of the pick
    # itself, where K−1 pairs count one decision as K−1 independent ones.
    best_of_k: BestOfKLoss = setting("softmax", help="loss for best-of-K picks: softmax over the K rewards, or K-1 "
                                                     "pairs")
    # Which pairs train: 'all', 'label' (the researcher's own) or 'import'.
    sources: Sources = setting("all", help="train on labeled pairs, imported pairs, or all")
    # Fraction of prompts held out (by prompt-text hash) for a single head: a
    # fifth, so that a few dozen comparisons leave enough to stop on (an ensemble
    # stops each head on its own out-of-bag prompts instead). Evaluated at every epoch's end
    # and every eval_every steps within a long fine-tuning epoch.
    eval_fraction: float = setting(0.2, help="fraction of prompts held out (a single head; an ensemble holds out "
                                             "per head)")
    eval_every: int = setting(20, help="with --finetune: also evaluate every N steps within an epoch (the head "
                                       "alone is evaluated after every epoch)")
    # Token budget per sequence (prompt is cut from its start first) and per completion.
    max_length: int = setting(512, help="tokens per sequence; a long prompt is cut from its start")
    max_completion_tokens: int = setting(256, help="tokens per completion")
    seed: int = setting(0, help="random seed")

    def __post_init__(self) -> None:
        if self.epochs is not None and self.steps is not None:
            raise UserError("pass --epochs or --steps, not both")
        if self.sources not in SOURCES:
            raise UserError(f"unknown --sources {self.sources!r}: use one of {', '.join(SOURCES)}")
        if self.best_of_k not in BEST_OF_K_LOSSES:
            raise UserError(f"unknown best_of_k loss {self.best_of_k!r}: use one of {', '.join(BEST_OF_K_LOSSES)}")
        if self.readout not in POOLS:
            raise UserError(f"unknown --readout {self.readout!r}: use one of {', '.join(POOLS)}")
        for name in ("batch_size", "accum", "eval_every", "max_length", "ensemble"):
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
        return from_dict(cls, values, "reward config")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def heads(self) -> int:
        """Reward heads to train: the ensemble, or one under a fine-tuning."""
        return 1 if self.finetune else self.ensemble

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


@dataclass
class RewardJob:
    """What a 'reward' job's config holds: the base model and the training settings."""

    model: ModelOptions = field(default_factory=ModelOptions)
    reward: RewardConfig = field(default_factory=RewardConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RewardJob:
        """Read back what ``to_dict`` wrote into the job's row."""
        job = known(cls, values, "reward job")
        return cls(model=ModelOptions.from_dict(job.get("model", {})),
                   reward=RewardConfig.from_dict(job.get("reward", {})))


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


def held_out_name(meta: dict[str, Any]) -> str:
    """What a saved version's held-out figure is: out-of-bag for an ensemble (each
    pair judged by the heads that never saw its prompt), else a held-out split."""
    return "out-of-bag" if int(meta.get("heads", 1)) > 1 else "held-out"
