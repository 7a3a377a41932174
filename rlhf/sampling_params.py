"""How the policy answers: the sampling definition, apart from the sampling code
so that the command line can show its defaults without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

# What decides the kind of text sampled (batch size and seed do not): recorded
# with each reward version (Store.sampling_definition) and PPO session.
DEFINITION_KEYS = ("temperature", "top_p", "max_new_tokens")


@dataclass
class SamplingParams:
    """How the policy answers: the one definition that serves the labeling samples,
    the PPO rollouts and so the reward normalization (which reads the first rollout
    batch), so that the reward model is trained on, normalized on and applied to
    the same kind of text (DESIGN.md). Each reward version and PPO session records
    the definition it used (DEFINITION_KEYS); a PPO session takes its reward
    model's unless told otherwise.

    Defaults suit a 135M chat model on a CPU: temperature 0.7 (lm-human-preferences,
    TRL); top-p 1.0, the full distribution, which PPO's ratio and KL assume (TRL
    samples PPO rollouts so); 64 new tokens, the budget within which the embedded
    model finishes a third of its answers (measured on the sample prompts), with
    the missing-EOS penalty off in PPO for that reason (rlhf.ppo_config.PPOConfig)."""

    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 64
    # Sequences per call of the sampling loop (rlhf.decode). On a CPU a batch of
    # 64 draws about twice the tokens per second of a batch of 16 (103 against 57,
    # embedded model, 64 new tokens, measured with generate); the loop holds one
    # step's logits at a time, 64 x 49k.
    batch_size: int = 64
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0 (log-probs are computed from logits / temperature)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
