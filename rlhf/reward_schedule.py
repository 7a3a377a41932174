"""When reward training stops: the planned epochs, the learning-rate schedule,
and what a phase of training did. Shared by the heads (rlhf.reward_ensemble) and
the fine-tuning (rlhf.reward_train)."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.reward_config import RewardConfig
from rlhf.reward_loss import PairEval

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


@dataclass
class Phase:
    """What one phase of training did."""

    steps: int
    epochs: float
    eval: PairEval
    best_step: int
    stopped_early: bool
