"""The settings of a DPO job, ``DPOConfig``, and what a 'dpo' job's row holds
(``DPOJob``): the same labels the reward model learns from, turned into a policy
directly (Rafailov et al. 2023), each default with its reason."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from rlhf.config_fields import from_dict, known, setting
from rlhf.errors import UserError
from rlhf.model_options import ModelOptions
from rlhf.reward_config import Sources


@dataclass
class DPOConfig:
    """DPO's sigmoid loss on the labeled pairs, the policy LoRA adapter trained
    against a frozen reference (the policy the job starts from)."""

    # The KL strength of the implicit reward r = beta * log(pi / pi_ref): TRL's
    # and the paper's default.
    beta: float = setting(0.1, help="DPO beta: how far from the reference the implicit reward lets the policy go")
    # A solo researcher's tens of pairs are few steps an epoch (the lesson of the
    # reward model): several passes, a policy version saved after each.
    epochs: int = setting(3, help="passes over the pairs; a policy version is saved after each")
    # LoRA trains at ~10x the full-model rate (TRL's DPO recipes: 5e-7..5e-6 full, 5e-5..2e-4 LoRA).
    learning_rate: float = setting(1e-4, help="Adam learning rate", aliases=["--lr"])
    batch_size: int = setting(8, help="pairs per optimizer step")
    max_grad_norm: float = setting(1.0, help="gradient norm clip")
    sources: Sources = setting("label", help="train on labeled pairs, imported pairs, or all")
    # Held out by prompt, as the reward model's split: the preference accuracy on
    # pairs the policy never trained on.
    eval_fraction: float = setting(0.2, help="fraction of prompts held out")
    max_completion_tokens: int = setting(256, help="tokens per completion")
    # After each epoch the policy answers this many labeled prompts, and the KL
    # to the reference is measured on its answers (the drift DPO does not report itself).
    kl_prompts: int = setting(8, help="prompts the policy answers after each epoch to measure its KL")
    seed: int = setting(0, help="random seed")

    def __post_init__(self) -> None:
        if self.beta <= 0 or self.learning_rate <= 0:
            raise UserError("DPO beta and learning rate must be > 0")
        if self.epochs < 1 or self.batch_size < 1 or self.kl_prompts < 0:
            raise UserError("epochs and batch size must be at least 1, KL prompts at least 0")
        if not 0 <= self.eval_fraction < 1:
            raise UserError(f"the held-out fraction must be in [0, 1), got {self.eval_fraction}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DPOConfig:
        return from_dict(cls, values, "DPO config")


@dataclass
class DPOJob:
    """What a 'dpo' job's row holds: where it starts, the model, the settings."""

    init_policy_version: int | None = None  # None: the latest policy; 0: the base
    model: ModelOptions = field(default_factory=ModelOptions)
    dpo: DPOConfig = field(default_factory=DPOConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DPOJob:
        job = known(cls, values, "DPO job")
        return cls(init_policy_version=job.get("init_policy_version"),
                   model=ModelOptions.from_dict(job.get("model", {})),
                   dpo=DPOConfig.from_dict(job.get("dpo", {})))
