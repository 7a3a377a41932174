"""DPO from the same labels: its loss and implicit rewards by hand, a step that
moves the policy toward the chosen answers, and the job that saves a policy
version per epoch with its KL."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import synthetic_pairs

from rlhf import jobs
from rlhf.cli import main
from rlhf.dpo_config import DPOConfig, DPOJob
from rlhf.dpo_train import Pair, dpo_loss, pair_logprobs, store_pairs, train_dpo
from rlhf.errors import UserError
from rlhf.model_options import ModelOptions


def test_dpo_loss_and_implicit_rewards_by_hand():
    policy_chosen, policy_rejected = torch.tensor([-10.0, -8.0]), torch.tensor([-12.0, -7.0])
    ref_chosen, ref_rejected = torch.tensor([-11.0, -8.0]), torch.tensor([-11.0, -8.0])
    loss, stats = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.5)
    # implicit rewards 0.5*(+1, 0) chosen, 0.5*(-1, +1) rejected; margins 1.0 and -0.5
    expected = -(math.log(1 / (1 + math.exp(-1.0))) + math.log(1 / (1 + math.exp(0.5)))) / 2
    assert float(loss) == pytest.approx(expected)
    assert float(stats["rewards/chosen"]) == pytest.approx(0.25)
    assert float(stats["rewards/rejected"]) == pytest.approx(0.0)
    assert float(stats["rewards/accuracies"]) == 0.5
    assert float(stats["rewards/margins"]) == pytest.approx(0.25)


def test_dpo_steps_raise_the_chosen_log_ratio_over_the_rejected(tiny_stack):
    tok = tiny_stack.tokenizer
    pairs = [Pair(f"Question {i}", tok(f"Question {i}")["input_ids"],
                  tok(" yes indeed")["input_ids"] + [tok.eos_token_id],
                  tok(" no never")["input_ids"] + [tok.eos_token_id]) for i in range(8)]

    def margin() -> float:
        with torch.no_grad(), tiny_stack.role("policy"):
            chosen, rejected = pair_logprobs(tiny_stack, pairs)
        with torch.no_grad(), tiny_stack.role("reference"):
            ref_chosen, ref_rejected = pair_logprobs(tiny_stack, pairs)
        return float(((chosen - ref_chosen) - (rejected - ref_rejected)).mean())

    assert margin() == pytest.approx(0.0, abs=1e-4)  # a fresh adapter is the reference
    logged = {}
    result = train_dpo(tiny_stack, pairs, DPOConfig(epochs=2, batch_size=4, learning_rate=1e-3, eval_fraction=0.0),
                       log=logged.__setitem__)
    assert result.steps == 4 and result.n_eval == 0
    assert margin() > 0.5
    assert logged[4]["rewards/accuracies"] == 1.0 and logged[4]["loss"] < logged[1]["loss"]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"} <= set(logged[1])


def test_the_dpo_job_saves_a_version_per_epoch_with_its_kl(store, db_path, tiny_dir, capsys):
    synthetic_pairs(store, 24)
    job = DPOJob(init_policy_version=0, model=ModelOptions(source=tiny_dir, quantize=False, device="cpu"),
                 dpo=DPOConfig(epochs=2, batch_size=8, learning_rate=1e-3, sources="import", kl_prompts=2,
                               eval_fraction=0.25))
    job_id = store.create_job("dpo", job.to_dict())
    assert jobs.run(db_path, job_id) == 0, store.job(job_id).error
    versions = store.checkpoints("policy")
    assert [v.meta["iteration"] for v in versions] == [1, 2]
    assert [v.parent_version for v in versions] == [0, versions[0].version]
    assert all(v.meta["method"] == "dpo" and v.meta["reference_version"] == 0 for v in versions)
    assert all(math.isfinite(v.meta["kl"]) for v in versions) and versions[-1].meta["eval_pairs"] >= 1
    metrics = store.metrics(job_id)
    assert len(metrics["objective/kl"]) == 2 and "eval/rewards/accuracies" in metrics
    # A PPO session does not "resume" a DPO version: it starts a new session from it.
    assert main(["--db", str(db_path), "ppo", "--resume", "--reward", "rule:distinct"]) == 2
    assert "was trained by DPO" in capsys.readouterr().err


def test_dpo_without_pairs_is_one_clear_line(cli_db, capsys):
    assert main(["--db", str(cli_db), "dpo"]) == 2
    err = capsys.readouterr().err
    assert "no labeled preference pairs for DPO" in err and "\n" not in err.strip()
    with pytest.raises(UserError, match="beta"):
        DPOConfig(beta=0)


def test_store_pairs_keep_sampled_tokens_as_sampled(store, tiny_stack):
    from rlhf.preferences import record_label

    prompt_id = store.add_prompt("Say something.")
    ids = store.add_completions(prompt_id, [
        {"text": "cut short", "token_ids": [11, 12], "n_tokens": 2, "finish_reason": "length"},
        {"text": "done", "token_ids": [13, tiny_stack.tokenizer.eos_token_id], "n_tokens": 2,
         "finish_reason": "eos"}])
    record_label(store, prompt_id, ids, "best", [0])
    [pair] = store_pairs(store, tiny_stack.tokenizer)
    assert pair.chosen == [11, 12]  # no EOS the model never emitted
    assert pair.rejected == [13, tiny_stack.tokenizer.eos_token_id]


def test_rlhf_dpo_follows_the_job_and_jobs_cancel_reaches_it(store, db_path, tiny_dir, capsys):
    synthetic_pairs(store, 12)
    db = ["--db", str(db_path)]
    model = ["--model", tiny_dir, "--no-4bit", "--device", "cpu"]
    assert main([*db, "dpo", "--sources", "import", "--epochs", "1", "--kl-prompts", "0", "--lr", "1e-3",
                 "--policy-version", "0", *model]) == 0
    out = capsys.readouterr().out
    assert "epoch 1  step" in out and "KL not measured" in out and "held-out accuracy" in out
    assert store.checkpoint("policy").meta["kl"] is None
    # A long job is stopped by `rlhf jobs cancel`, as every job is.
    assert main([*db, "dpo", "--sources", "import", "--epochs", "50", "--no-wait", *model]) == 0
    job = store.jobs("dpo")[-1]
    assert main([*db, "jobs", "cancel", str(job.id)]) == 0
    assert jobs.wait(store, job.id, timeout_s=120).status == "cancelled"


def test_one_prompt_held_out_still_trains(tiny_stack):
    tok = tiny_stack.tokenizer
    pairs = [Pair("Only prompt", tok("Only prompt")["input_ids"], [5, tok.eos_token_id], [6, tok.eos_token_id])]
    result = train_dpo(tiny_stack, pairs, DPOConfig(epochs=1, eval_fraction=0.99))
    assert (result.steps, result.n_train, result.n_eval) == (1, 1, 0)
