"""The settings of a PPO session, ``PPOConfig``: sizes, sampling, the reward,
optimisation, advantages and the KL penalty, each default with its source or the
measurement that chose it. A job's config dict holds these keys (and others,
such as the model, which ``from_dict`` leaves out).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from rlhf.errors import UserError
from rlhf.ppo_math import MISSING_EOS_MODES
from rlhf.sampling_params import SamplingParams


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
        if self.missing_eos not in MISSING_EOS_MODES:
            raise UserError(f"unknown missing-EOS setting {self.missing_eos!r}: use one of "
                            f"{', '.join(MISSING_EOS_MODES)}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PPOConfig:
        """The PPO keys of a job config (other keys, such as the model, ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names and v is not None})
