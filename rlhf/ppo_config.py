"""The settings of a PPO session, ``PPOConfig``: sizes, sampling, the reward,
optimisation, advantages and the KL penalty, each default with its source or the
measurement that chose it; and ``PPOJob``, what a 'ppo' job's config holds (the
session's extent, the model, the PPOConfig settings given).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from rlhf.config_fields import from_dict, known, setting
from rlhf.errors import UserError
from rlhf.model_options import ModelOptions
from rlhf.sampling_params import SamplingParams

# A session's length when neither iterations nor minutes are given.
DEFAULT_ITERATIONS = 10

# How advantages are estimated (PPOConfig.algorithm).
Algorithm = Literal["ppo", "rloo"]
ALGORITHMS: tuple[str, ...] = get_args(Algorithm)

# What becomes of the score of an answer that never emitted EOS (PPOConfig.missing_eos).
MissingEOS = Literal["off", "replace", "subtract"]
MISSING_EOS_MODES: tuple[str, ...] = get_args(MissingEOS)


@dataclass
class PPOConfig:
    """PPO hyperparameters. Sizes are scaled down for a CPU; the rest follow the
    sources named beside each."""

    # -- the estimator
    # 'ppo': GAE over the shaped per-token reward with a value head (TRL's PPO,
    # lm-human-preferences). 'rloo': REINFORCE leave-one-out (Ahmadian et al.
    # 2024, arXiv 2402.14740; TRL's RLOOTrainer): rloo_k samples per prompt, each
    # sample's baseline the mean sequence reward of the other k-1, the same
    # advantage on every token, no value head; the PPO clip and epochs stay.
    # Measured on the loop benchmark (60 rule labels, 16 iterations, 40 held-out
    # prompts, one seed each): RLOO 0.697 at 6.96 nats ("you") and 0.694 at 9.02
    # (digits); PPO 0.613 at 4.64 and 0.738 at 8.73 on the same labels. Neither
    # is better on both tastes, so the default stays PPO.
    algorithm: Algorithm = setting("ppo", help="advantage estimator: ppo (GAE with a value head) or rloo "
                                               "(leave-one-out baseline over --rloo-k samples per prompt)")
    rloo_k: int = setting(4, help="rloo: samples per prompt (the batch size must be a multiple)")
    # -- rollouts
    # lm-human-preferences: 512 episodes; CPU-sized here. 32, not 16: an iteration
    # costs ~60 s instead of ~45 on two cores, but the gradient follows the reward
    # more than the noise of a few answers. Measured on the loop benchmark (same
    # labels and seed, KL budget 10): "you/your" seed 1 0.724 win-rate at 8.6 nats
    # against 0.555 at 6.6 with 16 (30 iterations); digits seed 0 0.809 at 9.3
    # against 0.695 at 8.9; "you/your" seed 0 0.787 at 8.5 against 0.773 at 11.6.
    batch_size: int = setting(32, help="episodes per iteration")
    # The whole batch per optimizer step: with 16 episodes, steps on 4 followed the
    # noise of a few answers. Measured on the loop benchmark (bf16, same labels and
    # seed, with lr 2e-4 below): digits 0.742 win-rate at 9.6 nats against 0.649 at
    # 8.1 and 0.734 at 11.0 with 4 (lr 1e-4); "you/your" 0.773 at 11.6 against 0.750
    # at 9.9 and 0.811 at 13.7, on the same line.
    mini_batch_size: int | None = setting(None, help="sequences per optimizer step (default: the whole batch)")
    # TRL local_rollout_forward_batch_size.
    forward_batch_size: int = setting(16, help="sequences per no-grad forward pass at rollout")
    # TRL num_ppo_epochs, lm-human-preferences noptepochs.
    epochs: int = setting(4, help="PPO epochs over each batch")
    # How the policy answers: rlhf.sampling_params.SamplingParams, the one definition.
    # A session started without them takes its reward model's (``session_settings``).
    max_new_tokens: int = setting(SamplingParams.max_new_tokens, help="length budget in tokens (default: as the "
                                  "reward model's labels were sampled, else %(default)s)")
    # Log-probs use logits / temperature.
    temperature: float = setting(SamplingParams.temperature, help="sampling temperature (default: as the reward "
                                 "model's labels were sampled, else %(default)s)")
    top_p: float = setting(SamplingParams.top_p, help="nucleus sampling mass, 1.0 = the full distribution (default: "
                           "as the reward model's labels were sampled, else %(default)s)")
    # -- the reward
    # Normalize a reward model's scores on the session's first rollout batch (a
    # sample of its reference) to mean 0, std 1, so beta means the same in every
    # session (lm-human-preferences). Rules keep their own scale.
    normalize_reward: bool = setting(True, help="normalize a reward model's scores on the first rollout batch")
    # A completion without EOS: 'off' scores it as the reward model reads it (EOS
    # appended, as in training); 'replace' gives it -missing_eos_penalty (OpenAI:
    # -1, where most responses finished); 'subtract' takes the penalty off its
    # score. Off by default: measured on the embedded model, 35% of answers end
    # within 64 tokens (23% within 32), so a penalty drowned the labels and PPO
    # learned "stop early" instead.
    missing_eos: MissingEOS = setting(
        "off", help="score of an answer that never emitted EOS: off = the reward model's, replace = -penalty, "
                    "subtract = score - penalty")
    missing_eos_penalty: float = setting(1.0, help="the missing-EOS penalty")
    # A conservative reward: the ensemble's mean less this many of its spread, so
    # that answers the labels do not cover score lower (uncertainty-weighted
    # optimization, Coste et al. 2023, arXiv 2310.02743). 0: the mean alone.
    uncertainty_penalty: float = setting(0.0, help="maximize the reward ensemble's mean minus this many of its "
                                                   "spread (0: the mean)")
    # -- optimisation
    # LoRA trains at ~10x the full-model rate (TRL's 3e-6 is for full weights).
    # Measured on the loop benchmark (`more=\d`, win-rate against the reference,
    # KL on held-out prompts): 1e-4 gave 0.68 at 6.5 nats after 12 iterations;
    # 3e-4 gave 0.68 at 10.1 after 7 and 0.90 at 22 after 12 -- faster, no more
    # preference per nat.
    # With the whole batch per step (4 steps an iteration instead of 16): 2e-4.
    learning_rate: float = setting(2e-4, help="Adam learning rate", aliases=["--lr"])
    # "N implementation details" / lm-human-preferences.
    adam_eps: float = setting(1e-5, help="Adam epsilon")
    # TRL (transformers TrainingArguments default).
    max_grad_norm: float = setting(1.0, help="gradient norm clip")
    # -- advantages and losses
    gamma: float = setting(1.0, help="discount")  # lm-human-preferences / TRL
    # lm-human-preferences / TRL. lam = 1 (the whole score on every token, less
    # reliance on the untrained value head) measured no better on the loop
    # benchmark (`more=\d`, 12 iterations): 0.57 against 0.68 win-rate at KL 6.7.
    lam: float = setting(0.95, help="GAE lambda: 1 gives every token the whole score, lower leans on the value "
                                     "head", aliases=["--gae-lambda"])
    # TRL cliprange, lm-human-preferences.
    clip: float = setting(0.2, help="policy ratio clip")
    clip_value: float = setting(0.2, help="value clip")  # TRL cliprange_value
    vf_coef: float = setting(0.1, help="value loss weight")  # TRL vf_coef, lm-human-preferences
    # -- the KL penalty
    # Fixed beta; InstructGPT found 0.01-0.02 best, TRL defaults to 0.05. With the
    # score at std 1, beta 0.25 (lr 3e-4) held KL near 6 but learned nothing
    # (0.50 win-rate): in a short session the penalty is not what bounds KL, the
    # number of iterations is.
    beta: float = setting(0.05, help="KL coefficient (the starting value with --adaptive-kl)")
    adaptive_kl: bool = setting(False, help="adapt beta towards --target-kl (lm-human-preferences' proportional "
                                            "controller)")
    target_kl: float = setting(6.0, help="target KL in nats per sequence")  # lm-human-preferences
    kl_horizon: int = setting(10_000, help="the KL controller's horizon in episodes")  # lm-human-preferences
    # What a researcher watching the KL plot does by hand: stop where the drift is
    # more than they accept. The batch that passes it was sampled by the latest
    # version, so that version is past the budget and its parent is the last within.
    kl_budget: float | None = setting(None, help="end the session when a batch's KL to the reference passes this "
                                                 "many nats per answer, before training on it; the version that "
                                                 "sampled it is marked past the budget (default: no budget)")
    # -- safety: a ratio this far from 1 means the update blew up
    max_ratio: float = setting(10.0, help="fail the session when a policy ratio strays this far from 1")
    seed: int | None = setting(0, help="random seed")

    def __post_init__(self) -> None:
        if (self.batch_size < 2 or self.minibatch < 1 or self.minibatch > self.batch_size
                or self.forward_batch_size < 1):
            raise UserError("batch size must be at least 2 and the minibatch between 1 and the batch size")
        if self.kl_budget is not None and self.kl_budget <= 0:
            raise UserError(f"--kl-budget {self.kl_budget:g} must be positive: nats per answer, e.g. 10")
        if self.epochs < 1 or self.max_new_tokens < 1:
            raise UserError("epochs and max new tokens must be at least 1")
        if self.temperature <= 0 or self.beta < 0 or self.learning_rate <= 0:
            raise UserError("temperature and learning rate must be > 0 and beta >= 0")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top-p must be in (0, 1], got {self.top_p}")
        if not (0 <= self.lam <= 1 and 0 <= self.gamma <= 1):
            raise UserError(f"GAE lambda and gamma must be in [0, 1], got {self.lam} and {self.gamma}")
        if self.algorithm not in ALGORITHMS:
            raise UserError(f"unknown algorithm {self.algorithm!r}: use one of {', '.join(ALGORITHMS)}")
        if self.algorithm == "rloo" and (self.rloo_k < 2 or self.batch_size % self.rloo_k):
            raise UserError(f"rloo needs at least 2 samples per prompt and a batch size that is a multiple of "
                            f"them: got --rloo-k {self.rloo_k} and --batch-size {self.batch_size}")
        if self.uncertainty_penalty < 0:
            raise UserError(f"--uncertainty-penalty must be at least 0, got {self.uncertainty_penalty}")
        if self.missing_eos not in MISSING_EOS_MODES:
            raise UserError(f"unknown missing-EOS setting {self.missing_eos!r}: use one of "
                            f"{', '.join(MISSING_EOS_MODES)}")

    @property
    def minibatch(self) -> int:
        """Sequences per optimizer step (TRL's per_device_train_batch_size)."""
        return self.batch_size if self.mini_batch_size is None else self.mini_batch_size

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PPOConfig:
        return from_dict(cls, values, "PPO config")


@dataclass
class PPOJob:
    """What a 'ppo' job is asked to do, as its row's config holds it: the
    session's extent and start, the model, and the PPOConfig settings given.
    Settings not given come from the resumed session, else (sampling) from how
    the reward model's labels were sampled, else PPOConfig (``session_settings``)."""

    iterations: int | None = None          # the session ends after this many, or
    minutes: float | None = None           # after the iteration that passes this many minutes
    reward: int | str | None = None        # a reward version, 'rule:NAME', or None for the latest
    init_policy_version: int | None = None  # None: the latest policy; 0: the base
    prompt_file: str | None = None         # prompts from this file instead of the store
    save_every: int = 1                    # save a policy version every N iterations
    resume: bool = False                   # continue the last session from its latest checkpoint
    model: ModelOptions = field(default_factory=ModelOptions)
    ppo: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        PPOConfig.from_dict(self.ppo)  # a bad or unknown setting fails here, not in the background

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PPOJob:
        """Read back what ``to_dict`` wrote into the job's row."""
        session = known(cls, values, "PPO session")
        return cls(**{**session, "model": ModelOptions.from_dict(session.get("model", {}))})
