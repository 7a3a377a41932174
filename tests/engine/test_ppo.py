"""PPO: the formulas against hand-computed values, the loop on the tiny model with a
rule reward, the job's checkpoints, divergence guard, stop and resume."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from rlhf import ppo_math as pm
from rlhf.chat import chat_prompt_ids
from rlhf.errors import UserError
from rlhf.ppo import prepare_stack
from rlhf.ppo_config import PPOConfig, PPOJob
from rlhf.ppo_rollout import rule_scorer
from rlhf.ppo_session import PPOSession

PROMPTS = ["Say hello.", "What is 2 + 2?", "Write a poem about tea.", "Tell me a joke."]


# --- formulas ------------------------------------------------------------------------


def test_gae_matches_hand_computation():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])
    values = torch.tensor([[0.5, 0.2, 0.1], [0.5, 1.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 2 ended after 2 tokens
    adv, ret = pm.compute_gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 1: d2 = 1 - 0.1 = 0.9; d1 = 0.1 - 0.2 = -0.1 -> A1 = -0.1 + 0.5*0.9 = 0.35;
    #        d0 = 0.2 - 0.5 = -0.3 -> A0 = -0.3 + 0.5*0.35 = -0.125
    # row 2: padding is terminal: d1 = 2 - 1 = 1; d0 = 1 - 0.5 = 0.5 -> A0 = 0.5 + 0.5*1 = 1
    assert torch.allclose(adv, torch.tensor([[-0.125, 0.35, 0.9], [1.0, 1.0, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[0.375, 0.55, 1.0], [1.5, 2.0, 0.0]]))


def test_gae_with_gamma_discounts_next_value():
    adv, _ = pm.compute_gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 0.0]]), torch.ones(1, 2),
                            gamma=0.5, lam=1.0)
    assert torch.allclose(adv, torch.tensor([[0.5, 1.0]]))


def test_masked_whiten_ignores_padding():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # mean 2, unbiased variance ((1 + 0 + 1) / 2) = 1
    assert torch.allclose(pm.masked_whiten(values, mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6)
    assert torch.allclose(pm.masked_whiten(values, mask, shift_mean=False), torch.tensor([[1.0, 2.0, 3.0, 0.0]]),
                          atol=1e-6)


def test_shaped_reward_puts_score_on_last_token():
    logp = torch.tensor([[-1.0, -2.0, -1.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -1.0], [-1.0, -2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = pm.shaped_rewards(torch.tensor([3.0, 5.0]), logp, ref, mask, beta=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.0, 3.0], [0.0, 5.0 - 0.1, 0.0]]))


def test_rloo_baseline_is_the_mean_of_the_other_samples_of_the_prompt():
    scores = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    kl = torch.tensor([[0.5, 0.5], [0.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    # beta 0.5: sequence rewards 0.5, 2, 5 | 0, 0, 3; baselines (2+5)/2, (0.5+5)/2, (0.5+2)/2 | 1.5, 1.5, 0
    advantages = pm.rloo_advantages(scores, kl, beta=0.5, k=3)
    assert advantages.tolist() == pytest.approx([0.5 - 3.5, 2 - 2.75, 5 - 1.25, -1.5, -1.5, 3.0])


def test_clipped_policy_loss():
    adv = torch.tensor([[1.0, -1.0]])
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5, both outside [0.8, 1.2]
    loss, stats = pm.policy_loss(new, old, adv, torch.ones(1, 2), clip=0.2)
    # max(-1*1.5, -1*1.2) = -1.2; max(1*0.5, 1*0.8) = 0.8 -> mean -0.2
    assert loss.item() == pytest.approx(-0.2)
    assert stats["clipfrac"].item() == pytest.approx(1.0)
    assert stats["ratio"].item() == pytest.approx(1.0)


def test_clipped_value_loss():
    loss, frac = pm.value_loss(torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[1.0]]),
                               torch.ones(1, 1), clip=0.2)
    assert loss.item() == pytest.approx(0.5 * 0.8 ** 2)  # the clipped prediction 0.2 is further off
    assert frac.item() == 1.0


def test_adaptive_kl_controller():
    ctl = pm.AdaptiveKL(0.1, target=6.0, horizon=10_000)
    ctl.update(12.0, 100)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 10_000))
    ctl = pm.AdaptiveKL(0.1, target=6.0, horizon=10_000)
    ctl.update(5.4, 1000)  # error -0.1
    assert ctl.value == pytest.approx(0.1 * (1 - 0.1 * 0.1))
    fixed = pm.FixedKL(0.05)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.05


def test_rule_rewards():
    s = rule_scorer("rule:token=7", eos_id=2, max_new_tokens=4)
    assert s.score_ids([[1]], [[7, 7, 3]], [False]).tolist() == [2.0]
    short = rule_scorer("rule:short", eos_id=2, max_new_tokens=4)
    assert short.score_ids([[1], [1]], [[5, 2], [5, 5, 5, 5]], [True, False]).tolist() == [0.5, -1.0]
    assert rule_scorer("rule:distinct", 2, 4).score_ids([[1]], [[5, 5, 6, 6]], [False]).tolist() == [0.5]
    with pytest.raises(UserError, match="unknown reward rule"):
        rule_scorer("rule:nonsense", 2, 4)


# --- the loop on the tiny model --------------------------------------------------------


def small_config(**overrides) -> PPOConfig:
    values = dict(batch_size=8, mini_batch_size=4, epochs=2, max_new_tokens=6, learning_rate=1e-3, seed=0)
    return PPOConfig(**{**values, **overrides})


def test_first_rollout_has_zero_kl_and_first_ratio_is_one(tiny_stack):
    scorer = rule_scorer("rule:distinct", tiny_stack.tokenizer.eos_token_id, 6)
    seen = []
    session = PPOSession(tiny_stack, scorer, PROMPTS, small_config(), on_minibatch=seen.append)
    metrics, batch = session.iteration(1)
    # A fresh LoRA adapter is the base exactly: pi == pi_ref before any update.
    assert metrics["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    assert batch.kl.abs().max().item() < 1e-5
    # Nothing has changed before the first step: pi_theta / pi_bar == 1.
    assert seen[0]["val/ratio"] == pytest.approx(1.0, abs=1e-4)
    assert seen[0]["policy/approxkl"] == pytest.approx(0.0, abs=1e-8)
    assert seen[0]["policy/clipfrac"] == 0.0
    for name in ("objective/scores", "objective/entropy", "objective/rlhf_reward", "policy/approxkl",
                 "policy/clipfrac", "loss/policy", "loss/value", "val/ratio", "val/var_explained", "beta"):
        assert math.isfinite(metrics[name]), name
    # The value head starts at zero and learns: the rollout's values were 0.
    assert batch.values.abs().max().item() == 0.0
    assert tiny_stack.value_head.weight.abs().sum().item() > 0


@pytest.fixture
def peaked_stack(tiny_stack):
    """The tiny model with its tied embeddings scaled up. A random init (std 0.02)
    gives logits nearly uniform over 49k tokens, which no LoRA can sharpen; scaled,
    its next-token distributions are as peaked as a trained model's, and it
    repeats tokens, which the 'distinct' rule penalises."""
    with torch.no_grad():
        tiny_stack.peft.get_base_model().model.embed_tokens.weight.mul_(7.0)
    return tiny_stack


def test_a_few_iterations_raise_the_score_with_bounded_kl(peaked_stack):
    """Six iterations raise the mean score of the policy, measured on 64 fresh
    samples before and after (batch means are too noisy to compare); checked
    over seeds 0-2 at +0.13 to +0.24."""
    torch.manual_seed(0)
    config = small_config(batch_size=16, epochs=4, max_new_tokens=8, learning_rate=2e-3, beta=0.05)
    scorer = rule_scorer("rule:distinct", peaked_stack.tokenizer.eos_token_id, config.max_new_tokens)
    session = PPOSession(peaked_stack, scorer, PROMPTS, config)
    before = session.rollout(PROMPTS * 16).scores.mean().item()
    history = [session.iteration(i)[0] for i in range(1, 7)]
    after = session.rollout(PROMPTS * 16).scores.mean().item()
    kls = [m["objective/kl"] for m in history]
    assert after > before + 0.05, (before, after)
    assert kls[0] == pytest.approx(0.0, abs=1e-5)
    assert max(kls) < 5.0, kls  # nats per sequence of 8 tokens, with beta 0.05


def test_rloo_samples_each_prompt_k_times_and_raises_the_score(peaked_stack):
    """RLOO: the batch holds each prompt rloo_k times in a row, no value head
    trains, and the same six iterations as PPO's test raise the score."""
    torch.manual_seed(0)
    config = small_config(batch_size=16, epochs=4, max_new_tokens=8, learning_rate=2e-3, beta=0.05,
                          algorithm="rloo", rloo_k=4)
    scorer = rule_scorer("rule:distinct", peaked_stack.tokenizer.eos_token_id, config.max_new_tokens)
    session = PPOSession(peaked_stack, scorer, PROMPTS, config)
    prompts = session.next_prompts()
    assert len(prompts) == 16 and all(len(set(prompts[i:i + 4])) == 1 for i in range(0, 16, 4))
    assert len(set(prompts)) == 4
    before = session.rollout(PROMPTS * 16).scores.mean().item()
    history = [session.iteration(i)[0] for i in range(1, 7)]
    after = session.rollout(PROMPTS * 16).scores.mean().item()
    assert after > before + 0.05, (before, after)
    assert peaked_stack.value_head.weight.abs().sum().item() == 0  # untouched: RLOO has no value head
    assert "loss/value" not in history[0] and "val/var_explained" not in history[0]
    assert max(m["objective/kl"] for m in history) < 5.0


def test_rloo_needs_whole_groups():
    with pytest.raises(UserError, match="multiple"):
        PPOConfig(algorithm="rloo", rloo_k=3, batch_size=16)
    with pytest.raises(UserError, match="unknown algorithm"):
        PPOConfig(algorithm="dpo")


def test_exploding_ratio_stops_before_any_step(tiny_stack):
    scorer = rule_scorer("rule:distinct", tiny_stack.tokenizer.eos_token_id, 6)
    session = PPOSession(tiny_stack, scorer, PROMPTS, small_config(max_ratio=0.5))  # 1.0 > 0.5 at once
    before = [p.detach().clone() for p in session.params]
    with pytest.raises(UserError, match="diverged at iteration 1: the ratio"):
        session.iteration(1)
    assert all(torch.equal(a, b) for a, b in zip(before, session.params))


# --- the job: checkpoints, NaN, resume ---------------------------------------------------


def job_config(tiny_dir, ppo=None, **overrides):
    """A small session on the tiny model, as the job's row holds it."""
    from rlhf.model_options import ModelOptions
    from rlhf.ppo_config import PPOJob

    settings = {"batch_size": 4, "mini_batch_size": 2, "epochs": 1, "max_new_tokens": 4, "seed": 0, **(ppo or {})}
    job = PPOJob(model=ModelOptions(source=tiny_dir, quantize=False, device="cpu"), reward="rule:distinct",
                 iterations=2, ppo=settings)
    return replace(job, **overrides).to_dict()


def run_in_process(store, db_path, config):
    from rlhf import jobs

    job_id = store.create_job("ppo", config)
    jobs.run(db_path, job_id)
    return store.job(job_id)


def test_job_logs_metrics_and_registers_a_version_per_iteration(store, db_path, tiny_dir):
    store.add_prompts(PROMPTS)
    job = run_in_process(store, db_path, job_config(tiny_dir))
    assert job.status == "done", job.error
    versions = store.checkpoints("policy")
    assert [v.version for v in versions] == [1, 2]
    assert [v.parent_version for v in versions] == [0, 1]
    assert versions[1].meta["reference_version"] == 0
    assert versions[1].meta["iteration"] == 2
    series = store.metrics(job.id)
    assert [s for s, _ in series["objective/kl"]] == [1, 2]
    assert series["objective/kl"][0][1] == pytest.approx(0.0, abs=1e-5)
    assert [len(store.rollouts(job.id, iteration)) for iteration in (1, 2)] == [4, 4]


def test_forced_nan_fails_the_session_without_a_checkpoint(store, db_path, tiny_dir, monkeypatch):
    import rlhf.ppo

    class NaNScorer:
        def score_ids(self, prompt_ids, completion_ids, finished):
            return torch.full((len(completion_ids),), float("nan"))

    monkeypatch.setattr(rlhf.ppo, "rule_scorer", lambda *a, **k: NaNScorer())
    store.add_prompts(PROMPTS)
    job = run_in_process(store, db_path, job_config(tiny_dir))
    assert job.status == "failed"
    assert "non-finite" in job.error and "nothing of this iteration was saved" in job.error
    assert store.checkpoints("policy") == []


def test_forced_nan_loss_fails_the_session(store, db_path, tiny_dir, monkeypatch):
    import rlhf.ppo_math

    real = rlhf.ppo_math.value_loss
    monkeypatch.setattr(rlhf.ppo_math, "value_loss",
                        lambda *a, **k: (real(*a, **k)[0] * float("nan"), torch.tensor(0.0)))
    store.add_prompts(PROMPTS)
    job = run_in_process(store, db_path, job_config(tiny_dir))
    assert job.status == "failed" and "loss/value is nan" in job.error
    assert store.checkpoints("policy") == []


def test_no_reward_model_is_a_clear_error(store, db_path, tiny_dir):
    store.add_prompts(PROMPTS)
    job = run_in_process(store, db_path, job_config(tiny_dir, reward=None))
    assert job.status == "failed"
    assert job.error == "no reward model: train one first (rlhf train-reward)"


def _perturb_policy(stack, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in stack.adapter_parameters("policy"):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _logits(stack, role):
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad(), stack.role(role):
        return stack.logits(stack.hidden(ids, torch.ones_like(ids)))


def test_resume_keeps_the_sessions_reference(store, tiny_stack, tmp_path):
    """Session started from v1; v2 written by it. Resuming loads v2 as the policy
    and v1 (not v2, not the base) as the reference."""
    _perturb_policy(tiny_stack, 1)
    v1_logits = _logits(tiny_stack, "policy")
    tiny_stack.save_adapter("policy", tmp_path / "v1")
    store.add_checkpoint("policy", tmp_path / "v1", meta={"reference_version": 0, "iteration": 3})
    _perturb_policy(tiny_stack, 2)
    v2_logits = _logits(tiny_stack, "policy")
    tiny_stack.save_adapter("policy", tmp_path / "v2")
    store.add_checkpoint("policy", tmp_path / "v2", parent_version=1,
                         meta={"reference_version": 1, "iteration": 5, "beta": 0.07})
    _perturb_policy(tiny_stack, 3)  # the stack now holds something else

    start = prepare_stack(tiny_stack, store, PPOJob(resume=True))
    assert (start.policy_version, start.reference_version, start.iteration, start.beta) == (2, 1, 5, 0.07)
    assert torch.allclose(_logits(tiny_stack, "policy"), v2_logits, atol=1e-5)
    assert torch.allclose(_logits(tiny_stack, "reference"), v1_logits, atol=1e-5)

    fresh = prepare_stack(tiny_stack, store, PPOJob(init_policy_version=1))
    assert (fresh.policy_version, fresh.reference_version) == (1, 1)
    assert torch.allclose(_logits(tiny_stack, "reference"), v1_logits, atol=1e-5)


def test_resume_without_a_checkpoint_is_a_clear_error(store, tiny_stack):
    with pytest.raises(UserError, match="nothing to resume"):
        prepare_stack(tiny_stack, store, PPOJob(resume=True))


def test_a_session_on_a_rule_resumes_without_a_reward_model(store, tmp_path):
    from rlhf.ppo import check_can_start

    store.add_prompts(PROMPTS)
    meta = {"reference_version": 0, "reward": "rule:distinct", "config": {}}
    store.add_checkpoint("policy", tmp_path / "v1", parent_version=0, meta=meta)
    check_can_start(store, PPOJob(resume=True, iterations=1))  # the session's own rule: nothing to train first
    with pytest.raises(UserError, match="no reward model"):
        check_can_start(store, PPOJob(iterations=1))  # a new session needs one


def test_stop_then_resume_continues_from_the_saved_version(store, db_path, tiny_dir):
    """The real thing: a background process, stopped after its first checkpoint,
    then resumed by a second job."""
    from rlhf import jobs

    store.add_prompts(PROMPTS)
    first = jobs.start_job(store, "ppo", job_config(tiny_dir, iterations=200))

    def stop_after_first_checkpoint(job):
        if store.checkpoints("policy") and job.control is None and job.status == "running":
            jobs.request(store, first, "cancel")

    job = jobs.wait(store, first, timeout_s=240, on_poll=stop_after_first_checkpoint)
    assert job.status == "cancelled", job.error
    saved = store.checkpoints("policy")
    last = saved[-1]
    assert last.meta["reference_version"] == 0

    second = jobs.start_job(store, "ppo", job_config(tiny_dir, iterations=1, resume=True))
    job = jobs.wait(store, second, timeout_s=240)
    assert job.status == "done", job.error
    new = store.checkpoints("policy")[-1]
    assert new.version == last.version + 1
    assert new.parent_version == last.version
    assert new.meta["reference_version"] == 0  # the first session's reference, kept
    assert new.meta["iteration"] == last.meta["iteration"] + 1
    assert [s for s, _ in store.metrics(second)["objective/scores"]] == [last.meta["iteration"] + 1]


def test_cli_refuses_what_would_fail_in_the_background(store, db_path, capsys):
    from rlhf.cli import main

    db = ["--db", str(db_path)]
    assert main([*db, "ppo"]) == 2
    assert "no reward model: train one first (rlhf train-reward)" in capsys.readouterr().err
    assert main([*db, "ppo", "--reward", "rule:distinct"]) == 2
    assert "no prompts" in capsys.readouterr().err
    assert main([*db, "ppo", "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main([*db, "ppo-control", "stop"]) == 2
    assert "no PPO session is running" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:  # argparse refuses a value no PPO could use
        main([*db, "ppo", "--reward", "rule:distinct", "--batch-size", "1"])
    assert refused.value.code == 2 and "--batch-size: must be at least 2" in capsys.readouterr().err
    assert store.jobs() == []  # nothing was started


def test_4bit_lora_gradients_survive_a_rollout(tiny_dir):
    """A no-grad pass (a rollout) must not switch bitsandbytes' CPU layers to a
    kernel without a backward: the LoRA gradients after one equal those before."""
    from rlhf.model_options import ModelOptions
    from rlhf.models import load_stack

    stack = load_stack(ModelOptions(source=tiny_dir, quantize=True, device="cpu"))
    assert stack.quantized
    g = torch.Generator().manual_seed(1)
    params = stack.adapter_parameters("policy")
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        p.requires_grad_(False)
    ids = torch.randint(100, 1000, (2, 10))
    mask = torch.ones_like(ids)

    def lora_grads():
        for p in params:
            p.grad = None
            p.requires_grad_(True)
        with stack.role("policy"):
            stack.logits(stack.hidden(ids, mask))[:, -1].logsumexp(-1).sum().backward()
        return torch.cat([p.grad.flatten() for p in params])

    before = lora_grads()
    with torch.no_grad(), stack.role("policy"):
        stack.hidden(ids, mask)  # what a rollout does
    after = lora_grads()
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-6)


# --- the reward PPO sees: normalization, missing EOS, one sampling definition -----------


def test_missing_eos_settings():
    scores, finished = torch.tensor([0.5, -0.2, 1.0]), torch.tensor([True, False, False])
    assert pm.penalize_missing_eos(scores, finished, "off").tolist() == scores.tolist()
    assert pm.penalize_missing_eos(scores, finished, "replace", 1.0).tolist() == [0.5, -1.0, -1.0]
    assert pm.penalize_missing_eos(scores, finished, "subtract", 0.5).tolist() == pytest.approx([0.5, -0.7, 0.5])
    with pytest.raises(UserError, match="unknown missing-EOS setting"):
        PPOConfig(missing_eos="sometimes")


def test_a_misspelt_setting_is_refused_not_dropped():
    with pytest.raises(UserError, match="unknown PPO config setting.*betta"):
        PPOConfig.from_dict({"betta": 0.1})
    with pytest.raises(UserError, match="unknown PPO config setting.*learning_rat\\b"):
        PPOJob(ppo={"learning_rat": 1e-3})
    with pytest.raises(UserError, match="unknown PPO session setting.*iteration\\b"):
        PPOJob.from_dict({"iteration": 3})


def test_cli_options_are_ppoconfigs_fields_and_only_the_given_ones_are_set(capsys):
    from rlhf.cli import build_parser
    from rlhf.commands.ppo import session_job

    args = build_parser().parse_args(["ppo", "--lr", "3e-4", "--gae-lambda", "1", "--adaptive-kl", "--kl-horizon",
                                      "500", "--no-normalize-reward", "--reward", "rule:short"])
    job = session_job(args)
    assert job.ppo == {"learning_rate": 3e-4, "lam": 1.0, "adaptive_kl": True, "kl_horizon": 500,
                       "normalize_reward": False}
    assert job.reward == "rule:short" and job.iterations == 10 and job.model.source == "embedded"
    assert PPOJob.from_dict(job.to_dict()) == job  # what the job's row holds reads back the same
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ppo", "--help"])
    help_text = capsys.readouterr().out
    assert "episodes per iteration (default 32)" in help_text  # the default, from the dataclass
    assert "--kl-horizon" in help_text and "--kl_horizon" not in help_text


@pytest.mark.parametrize("option", [{"lam": 1.5}, {"lam": -0.1}, {"gamma": 2.0}])
def test_gae_settings_outside_0_1_are_refused(option):
    with pytest.raises(UserError, match="GAE lambda and gamma must be in"):
        PPOConfig(**option)


def register_reward_model(stack, store, folder, **meta) -> int:
    """The tiny stack's (random) reward adapter and head as a stored reward version."""
    stack.ensure_adapter("reward")
    meta = {"gain": 3.0, "bias": -2.0, **meta}
    stack.save_adapter("reward", folder, meta=meta)
    return store.add_checkpoint("reward", folder, meta=meta)


def test_without_eos_the_reward_model_still_speaks_when_the_penalty_is_off(store, tiny_stack, tmp_path):
    from rlhf.reward_scoring import load_scorer

    register_reward_model(tiny_stack, store, tmp_path / "rm")
    scorer = load_scorer(tiny_stack, store)
    batch = PPOSession(tiny_stack, scorer, PROMPTS, small_config()).rollout(PROMPTS * 2)
    assert not any(s.finish_reason == "eos" for s in batch.samples)  # a random tiny model never stops
    # Normalized on this (first) batch, and each score is the reward model's own.
    assert batch.scores.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert batch.scores.std().item() == pytest.approx(1.0, abs=1e-4)
    prompt_rows = [chat_prompt_ids(tiny_stack.tokenizer, p) for p in batch.prompts]
    again = scorer.score_ids(prompt_rows, [s.token_ids for s in batch.samples], [False] * len(batch.samples))
    assert torch.allclose(batch.scores, again, atol=1e-4)
    # The old way: every score the penalty, nothing left of the labels.
    penalized = PPOSession(tiny_stack, scorer, PROMPTS, small_config(missing_eos="replace")).rollout(PROMPTS * 2)
    assert penalized.scores.tolist() == [-1.0] * 8


def test_an_ensembles_spread_is_logged_and_a_conservative_session_subtracts_it(store, tiny_stack, tmp_path):
    from rlhf.reward_scoring import load_scorer

    tiny_stack.set_reward_heads(4)   # four random heads: they disagree
    register_reward_model(tiny_stack, store, tmp_path / "rm")
    plain = PPOSession(tiny_stack, load_scorer(tiny_stack, store), PROMPTS, small_config(seed=3))
    batch = plain.rollout(PROMPTS * 2)
    assert batch.spread.shape == batch.scores.shape and (batch.spread > 0).all()
    prompt_rows = [chat_prompt_ids(tiny_stack.tokenizer, p) for p in batch.prompts]
    heads = plain.reward_model.heads_ids(prompt_rows, [s.token_ids for s in batch.samples])
    assert torch.allclose(batch.spread, heads.std(-1), atol=1e-4)     # on the scale PPO sees
    assert torch.allclose(batch.scores, heads.mean(-1), atol=1e-4)
    plain.advantages(batch)
    assert plain.batch_metrics(batch, plain.beta)["reward/spread"] == pytest.approx(batch.spread.mean().item())

    careful = PPOSession(tiny_stack, load_scorer(tiny_stack, store), PROMPTS, small_config(uncertainty_penalty=2.0))
    careful.normalization = plain.normalization                        # the same scale, to compare
    careful.reward_model.gain, careful.reward_model.bias = plain.reward_model.gain, plain.reward_model.bias
    scores, spread = careful.score(prompt_rows, batch.samples)
    assert torch.allclose(scores, batch.scores - 2.0 * batch.spread, atol=1e-4)
    with pytest.raises(UserError, match="uncertainty-penalty"):
        small_config(uncertainty_penalty=-1.0)


def test_a_session_normalizes_against_its_own_reference(store, db_path, tiny_dir, tiny_stack, tmp_path):
    """Started from policy v1, the session's reference is v1, and its first batch
    (v1's answers) scores mean 0, std 1 whatever the reward version's own
    normalization; a resumed session keeps that normalization."""
    register_reward_model(tiny_stack, store, tmp_path / "rm")
    _perturb_policy(tiny_stack, 1)
    tiny_stack.save_adapter("policy", tmp_path / "v1")
    store.add_checkpoint("policy", tmp_path / "v1")
    store.add_prompts(PROMPTS)
    job = run_in_process(store, db_path, job_config(tiny_dir, reward=None, init_policy_version=1, iterations=1,
                                                    ppo={"batch_size": 8, "mini_batch_size": 4}))
    assert job.status == "done", job.error
    series = store.metrics(job.id)
    assert series["objective/scores"][0][1] == pytest.approx(0.0, abs=1e-4)
    assert series["objective/scores_std"][0][1] == pytest.approx(1.0, abs=1e-4)
    meta = store.checkpoint("policy").meta
    assert meta["reference_version"] == 1 and meta["reward"] == 1 and meta["norm_samples"] == 8
    assert (meta["reward_gain"], meta["reward_bias"]) != (3.0, -2.0)

    resumed = run_in_process(store, db_path, job_config(tiny_dir, reward=None, resume=True, iterations=1))
    assert resumed.status == "done", resumed.error
    after = store.checkpoint("policy").meta
    assert after["iteration"] == 2
    assert (after["reward_gain"], after["reward_bias"]) == (meta["reward_gain"], meta["reward_bias"])


def test_a_new_session_samples_as_its_reward_models_labels_were_sampled(store, tiny_stack, tmp_path):
    from rlhf.ppo import sampling_mismatch, session_settings

    register_reward_model(tiny_stack, store, tmp_path / "rm",
                          sampling={"temperature": 0.9, "top_p": 0.8, "max_new_tokens": 5})
    settings = session_settings(store, PPOJob(reward=None, iterations=1))
    assert (settings.ppo["temperature"], settings.ppo["top_p"], settings.ppo["max_new_tokens"]) == (0.9, 0.8, 5)
    assert sampling_mismatch(settings, store) is None
    chosen = session_settings(store, PPOJob(reward=None, ppo={"max_new_tokens": 7}))
    assert chosen.ppo["max_new_tokens"] == 7 and chosen.ppo["temperature"] == 0.9
    assert "max_new_tokens 7 (labels: 5)" in sampling_mismatch(chosen, store)
    assert session_settings(store, PPOJob(reward="rule:distinct")).ppo.get("max_new_tokens") is None  # a rule: defaults


# --- the divergence guard, after the last step too ----------------------------------------


def poison_last_minibatch(monkeypatch, minibatches: int) -> None:
    """Make the gradient infinite at the ``minibatches``-th minibatch: what a bad
    step looks like before clip_grad_norm_ turns it into NaN weights."""
    real = torch.nn.utils.clip_grad_norm_
    calls = []

    def clip(params, max_norm, *args, **kwargs):
        params = list(params)
        calls.append(1)
        if len(calls) == minibatches:
            for p in params:
                if p.grad is not None:
                    p.grad.fill_(float("inf"))
        return real(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)


def test_a_bad_last_minibatch_puts_the_iteration_back(tiny_stack, monkeypatch):
    scorer = rule_scorer("rule:distinct", tiny_stack.tokenizer.eos_token_id, 6)
    session = PPOSession(tiny_stack, scorer, PROMPTS, small_config())  # 2 epochs x 2 minibatches
    session.iteration(1)
    params = [p.detach().clone() for p in session.params]
    moments = [v.clone() for s in session.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    poison_last_minibatch(monkeypatch, 4)  # counted from here: the last minibatch of iteration 2
    with pytest.raises(UserError, match="diverged at iteration 2: the gradient norm is inf"):
        session.iteration(2)
    assert all(torch.equal(a, b) for a, b in zip(params, session.params))
    restored = [v for s in session.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    assert all(torch.equal(a, b) for a, b in zip(moments, restored))


def test_a_ratio_collapsing_on_the_last_minibatch_fails_too(tiny_stack, monkeypatch):
    import rlhf.ppo_math

    real, calls = rlhf.ppo_math.policy_loss, []

    def policy_loss(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 4:  # the last of 2 epochs x 2 minibatches
            stats = {**stats, "ratio_geometric": torch.tensor(0.01)}
        return loss, stats

    monkeypatch.setattr(rlhf.ppo_math, "policy_loss", policy_loss)
    scorer = rule_scorer("rule:distinct", tiny_stack.tokenizer.eos_token_id, 6)
    session = PPOSession(tiny_stack, scorer, PROMPTS, small_config())
    before = [p.detach().clone() for p in session.params]
    with pytest.raises(UserError, match="the ratio pi/pi_old fell to 0.01"):
        session.iteration(1)
    assert all(torch.equal(a, b) for a, b in zip(before, session.params))


def spoil_last_step(session: PPOSession, steps: int, spoil) -> None:
    """Apply ``spoil`` to the trained parameters right after the ``steps``-th
    optimizer step: a step whose damage no check before it could see."""
    real, calls = session.optimizer.step, []

    def step(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == steps:
            with torch.no_grad():
                for p in session.params:
                    spoil(p)
        return result

    session.optimizer.step = step


def test_nan_weights_after_the_last_step_put_the_iteration_back(tiny_stack):
    scorer = rule_scorer("rule:distinct", tiny_stack.tokenizer.eos_token_id, 6)
    session = PPOSession(tiny_stack, scorer, PROMPTS, small_config())  # 2 epochs x 2 minibatches
    before = [p.detach().clone() for p in session.params]
    spoil_last_step(session, 4, lambda p: p.fill_(float("nan")))
    with pytest.raises(UserError, match="a policy parameter is not finite after the update"):
        session.iteration(1)
    assert all(torch.equal(a, b) for a, b in zip(before, session.params))


def test_a_last_step_that_blows_up_the_ratio_is_caught_after_it(peaked_stack):
    scorer = rule_scorer("rule:distinct", peaked_stack.tokenizer.eos_token_id, 6)
    session = PPOSession(peaked_stack, scorer, PROMPTS, small_config())
    before = [p.detach().clone() for p in session.params]
    spoil_last_step(session, 4, lambda p: p.add_(torch.randn_like(p) * 5.0))  # finite, but a different policy
    with pytest.raises(UserError, match=r"the ratio pi/pi_old (reached|fell to)"):
        session.iteration(1)
    assert all(torch.equal(a, b) for a, b in zip(before, session.params))


def test_a_collapsed_minibatch_is_seen_through_a_few_large_ratios():
    old = torch.zeros(2, 3)
    new = torch.tensor([[3.0, -4.0, -4.0], [-4.0, -4.0, -4.0]])  # one token up 20x, the rest down 55x
    _, stats = pm.policy_loss(new, old, torch.ones(2, 3), torch.ones(2, 3))
    assert float(stats["ratio"]) > 1 / 10  # the arithmetic mean hides the collapse
    assert float(stats["ratio_geometric"]) == pytest.approx(math.exp(-17.0 / 6), rel=1e-5)


def test_a_bad_last_minibatch_registers_no_version(store, db_path, tiny_dir, monkeypatch):
    store.add_prompts(PROMPTS)
    poison_last_minibatch(monkeypatch, 2 + 2)  # 1 epoch x 2 minibatches: the last of iteration 2
    job = run_in_process(store, db_path, job_config(tiny_dir))
    assert job.status == "failed"
    assert "gradient norm is inf" in job.error and "nothing of this iteration was saved" in job.error
    assert [c.version for c in store.checkpoints("policy")] == [1]  # iteration 1's, not the broken one


def test_the_researcher_is_warned_when_the_penalty_drowns_the_labels():
    from rlhf.ppo_session import penalty_warning

    assert penalty_warning({"val/penalized_fraction": 0.0}) is None
    assert penalty_warning({}) is None
    assert "80% of the batch never emitted EOS" in penalty_warning({"val/penalized_fraction": 0.8})


def test_a_kl_budget_ends_the_session_and_marks_the_version_past_it(store, db_path, tiny_dir, capsys):
    """The first batch is the reference's own (KL 0); the first batch after it whose KL
    passes a budget of 1e-6 nats (sampled by some vN: a batch's KL is an estimate, and a
    few tokens' can be below zero) ends the session, done, with vN marked and its batch kept."""
    store.add_prompts(PROMPTS)
    job = run_in_process(store, db_path, job_config(tiny_dir, ppo={"kl_budget": 1e-6, "learning_rate": 1e-2},
                                                    iterations=5))
    assert job.status == "done", job.error
    *within, past = store.checkpoints("policy")
    n = past.version
    assert [v.version for v in within] == list(range(1, n)) and not any("over_kl_budget" in v.meta for v in within)
    assert past.meta["over_kl_budget"] == 1e-6 and past.meta["own_kl"] > 1e-6 and past.parent_version == n - 1
    kl = dict(store.metrics(job.id)["objective/kl"])
    assert sorted(kl) == list(range(1, n + 2)) and kl[1] == pytest.approx(0.0, abs=1e-5)
    assert all(kl[i] <= 1e-6 for i in range(2, n + 1)) and kl[n + 1] == pytest.approx(past.meta["own_kl"])
    assert [r.policy_version for r in store.rollouts(job.id, n + 1)] == [n] * 4  # what passed it, kept
    assert (f"passed the budget of 1e-06 nats (sampled by v{n}): the session ends; v{n - 1} is the last version "
            "within it") in capsys.readouterr().out
    # Resumed from vN, already past it: a failure that says so, and nothing new saved.
    resumed = run_in_process(store, db_path, job_config(tiny_dir, ppo={"kl_budget": 1e-6}, iterations=5, resume=True))
    assert resumed.status == "failed" and f"the session resumed from v{n}, which is already past it" in resumed.error
    assert len(store.checkpoints("policy")) == n
