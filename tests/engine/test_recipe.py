"""`rlhf export-recipe` hands an experiment to TRL for a cluster: the labels in
TRL's format, the session's settings, and a script that runs (one step of each
stage here, on the tiny model, where TRL is installed)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
from conftest import synthetic_pairs

from rlhf.cli import main
from rlhf.model_options import ModelOptions
from rlhf.ppo_config import PPOConfig, PPOJob


def _ppo_version(store, tmp_path, **settings):
    """A policy version as a PPO session registers it, with its job's model options."""
    options = ModelOptions(source="/models/mine")
    options.lora.r = 4
    job = store.create_job("ppo", PPOJob(model=options).to_dict())
    folder = tmp_path / "v1"
    folder.mkdir()
    config = asdict(PPOConfig(**settings))
    store.add_checkpoint("policy", folder, job_id=job, parent_version=0,
                         meta={"job_id": job, "iteration": 1, "config": config})


def test_the_recipe_carries_the_labels_and_the_sessions_settings(store, db_path, tmp_path, capsys):
    synthetic_pairs(store, 6)
    _ppo_version(store, tmp_path, beta=0.2, max_new_tokens=8, temperature=0.9, rloo_k=2)
    out = tmp_path / "recipe"
    assert main(["--db", str(db_path), "export-recipe", str(out)]) == 0
    assert "6 pairs, /models/mine" in capsys.readouterr().out
    settings = json.loads((out / "recipe.json").read_text())
    assert settings["policy_version"] == 1 and settings["base"] == "/models/mine" and settings["lora"]["r"] == 4
    assert {k: settings["session"][k] for k in ("beta", "max_new_tokens", "temperature", "rloo_k")} == {
        "beta": 0.2, "max_new_tokens": 8, "temperature": 0.9, "rloo_k": 2}
    rows = [json.loads(line) for line in (out / "preferences.jsonl").read_text().splitlines()]
    pairs = store.pairs()
    assert [(r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows] == [
        (p["prompt"], p["chosen"], p["rejected"]) for p in pairs]
    prompts = [json.loads(line)["prompt"] for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert sorted(m[0]["content"] for m in prompts) == sorted({p["prompt"] for p in pairs})
    readme = (out / "README.md").read_text()
    assert "beta 0.2" in readme and "point `--base`" in readme  # a local path must be pointed at on the cluster
    assert {"train.py", "accelerate.yaml"} <= {p.name for p in out.iterdir()}
    assert settings["reward_model"] == {"path": None, "why": "no reward model in the database"}


def test_the_recipe_refuses_what_it_cannot_write(store, db_path, tmp_path, capsys):
    db = ["--db", str(db_path)]
    assert main([*db, "export-recipe", str(tmp_path / "a")]) == 2
    assert "no labeled pairs" in capsys.readouterr().err and not (tmp_path / "a").exists()
    synthetic_pairs(store, 2)
    store.add_checkpoint("policy", tmp_path, parent_version=0, meta={"iteration": 1, "method": "dpo", "config": {}})
    assert main([*db, "export-recipe", str(tmp_path / "a"), "--version", "1"]) == 2
    assert "was not trained by a PPO or RLOO session" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("mine")
    assert main([*db, "export-recipe", str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "taken" / "file").read_text() == "mine"
    # Without a PPO session, the workbench's defaults and the embedded model's hub id.
    assert main([*db, "export-recipe", str(tmp_path / "b")]) == 0
    settings = json.loads((tmp_path / "b" / "recipe.json").read_text())
    assert settings["policy_version"] is None and settings["base"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert settings["session"]["beta"] == PPOConfig().beta


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL is not installed (the test extra has it)")
def test_the_recipe_runs_one_step_of_each_stage_with_trl(store, db_path, tmp_path, tiny_dir, tiny_stack):
    """Both stages, then RLOO against the workbench's own reward model, exported beside the script."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    synthetic_pairs(store, 12)
    _ppo_version(store, tmp_path, max_new_tokens=8, rloo_k=2)
    tiny_stack.ensure_adapter("reward")
    tiny_stack.save_adapter("reward", tmp_path / "r1", {})
    store.add_checkpoint("reward", tmp_path / "r1", meta={"readout": {"layer": 1, "pool": "mean"}})
    out = tmp_path / "recipe"
    assert main(["--db", str(db_path), "export-recipe", str(out), "--base", tiny_dir]) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    smoke = ["--cpu", "--max-steps", "1", "--report-to", "none"]
    for stage in (["all"], ["policy", "--reward", "reward_model", "--output", str(out / "theirs")]):
        done = subprocess.run([sys.executable, str(out / "train.py"), *stage, *smoke], cwd=tmp_path, env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "recipe.json").read_text())["reward_model"]["path"] == "reward_model"
    reward = AutoModelForSequenceClassification.from_pretrained(out / "runs" / "reward")
    assert reward.config.num_labels == 1
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), str(out / "runs" / "policy"))
    assert policy.peft_config["default"].r == 4
    assert (out / "theirs" / "policy" / "adapter_model.safetensors").exists()


def test_without_a_session_the_recipe_takes_the_reward_models_base(store, db_path, tmp_path):
    synthetic_pairs(store, 4)
    options = ModelOptions(source="/models/rm")
    options.lora.r = 8
    job = store.create_job("reward", {"model": asdict(options)})
    (tmp_path / "r1").mkdir()
    store.add_checkpoint("reward", tmp_path / "r1", job_id=job)
    assert main(["--db", str(db_path), "export-recipe", str(tmp_path / "out")]) == 0
    settings = json.loads((tmp_path / "out" / "recipe.json").read_text())
    assert settings["base"] == "/models/rm" and settings["lora"]["r"] == 8
    assert settings["reward_model"]["path"] is None and "cannot be exported" in settings["reward_model"]["why"]
