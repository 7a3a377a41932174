"""`--model DIR` beyond SmolLM2: tiny models of other families, built from a
config, go through sampling, reward training and a PPO iteration, each with the
check that decides whether that stage is sound on them."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, synthetic_pairs

from rlhf.model_options import ModelOptions
from rlhf.models import TINY_ARCHITECTURES, load_stack, tiny_model_dir
from rlhf.ppo_config import PPOConfig
from rlhf.ppo_rollout import rule_scorer
from rlhf.ppo_session import PPOSession
from rlhf.reward_config import RewardConfig
from rlhf.reward_data import store_elements
from rlhf.reward_train import train
from rlhf.sampling import SamplingParams, sample_k
from rlhf.tokens import teacher_forced_logprobs

OTHERS = [a for a in TINY_ARCHITECTURES if a != "llama"]  # llama: every other test


@pytest.fixture(params=OTHERS)
def other_stack(request):
    torch.manual_seed(0)
    stack = load_stack(ModelOptions(source=tiny_model_dir(arch=request.param), quantize=False, device="cpu",
                                    dtype="float32"))
    assert stack.peft.get_base_model().config.model_type == request.param
    return stack


def test_sampled_log_probs_are_what_teacher_forcing_reads(other_stack):
    params = SamplingParams(temperature=0.7, top_p=1.0, max_new_tokens=6, seed=1)
    rows = sample_k(other_stack, ["short", "a longer prompt, so that the other one is left-padded"], 2, params)
    for sample in (s for row in rows for s in row):
        assert sample.n_tokens >= 1
        [recomputed] = teacher_forced_logprobs(other_stack, "policy", sample.prompt_ids, [sample.token_ids],
                                               params.temperature)
        assert recomputed == pytest.approx(sample.logprobs, abs=2e-3)


def test_a_reward_model_learns_a_synthetic_taste(store, other_stack):
    synthetic_pairs(store, 40)
    elements = store_elements(store, other_stack.tokenizer)
    result = train(other_stack, elements, RewardConfig(lr=1e-2, eval_fraction=0.25))
    assert result.n_eval >= 6 and result.eval.accuracy >= 0.8, result


def test_a_ppo_iteration_starts_at_the_reference_and_steps(other_stack):
    config = PPOConfig(batch_size=4, mini_batch_size=2, epochs=1, max_new_tokens=4, learning_rate=1e-3, seed=0)
    seen = []
    session = PPOSession(other_stack, rule_scorer("rule:distinct", other_stack.tokenizer.eos_token_id, 4),
                         PROMPTS, config, on_minibatch=seen.append)
    before = [p.detach().clone() for p in other_stack.adapter_parameters("policy")]
    metrics, _ = session.iteration(1)
    assert metrics["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    assert seen[0]["val/ratio"] == pytest.approx(1.0, abs=1e-4)
    assert any(not torch.equal(a, p) for a, p in zip(before, other_stack.adapter_parameters("policy")))
