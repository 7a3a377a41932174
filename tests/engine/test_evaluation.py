"""A policy version against the base, judged by a rule: `rlhf eval-policy`."""

from __future__ import annotations

import json

import torch

from rlhf.store import Store


def test_eval_policy_judges_a_version_by_a_rule_with_its_kl(capsys, db_path, tiny_dir, tiny_stack, tmp_path):
    from rlhf.cli import main

    with Store(db_path) as store:
        tiny_stack.save_adapter("policy", tmp_path / "v1")  # a fresh adapter: the base exactly
        store.add_checkpoint("policy", tmp_path / "v1")
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in tiny_stack.adapter_parameters("policy"):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
        tiny_stack.save_adapter("policy", tmp_path / "v2")
        store.add_checkpoint("policy", tmp_path / "v2")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Say hello.\nName a colour.\nCount to three.\n")
    base = ["--db", str(db_path), "eval-policy", "--rule", "ids-below=20000", "--prompts", str(prompts),
            "--k", "2", "--max-new-tokens", "4", "--model", tiny_dir, "--no-4bit", "--device", "cpu"]

    assert main([*base, "--version", "1", "--json"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["prompts"] == 3 and same["k"] == 2 and same["against"] == 0
    assert abs(same["kl"]) < 1e-4  # the base against itself
    assert 0.0 <= same["winrate_low"] <= same["winrate"] <= same["winrate_high"] <= 1.0

    assert main([*base, "--version", "2"]) == 0
    out = capsys.readouterr().out
    assert "v2 vs v0 by rule:ids-below=20000: win-rate" in out and "on 3 prompts x 2x2 pairs" in out
    assert "KL " in out and "mean rule score" in out

    assert main([*base, "--version", "7"]) == 2
    assert "no policy version 7" in capsys.readouterr().err


def test_a_policy_that_moved_has_positive_kl_and_a_rate_per_prompt(tiny_stack):
    """On the tiny model made peaked (see test_ppo.peaked_stack), a perturbed policy
    against the base: the KL estimate is positive, the base against itself zero."""
    from rlhf.evaluation import evaluate
    from rlhf.rules import parse_rule
    from rlhf.sampling import SamplingParams

    with torch.no_grad():
        tiny_stack.peft.get_base_model().model.embed_tokens.weight.mul_(7.0)
    prompts, rule = ["Say hello.", "Name a colour."], parse_rule("ids-below=20000")
    params = SamplingParams(max_new_tokens=6, seed=0)
    same = evaluate(tiny_stack, prompts, rule, params, k=8, role="policy")
    assert abs(same.kl) < 1e-5
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tiny_stack.adapter_parameters("policy"):
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    moved = evaluate(tiny_stack, prompts, rule, params, k=8, role="policy")
    assert moved.kl > 0.1, moved.kl
    assert len(moved.winrates) == 2 and all(0.0 <= w <= 1.0 for w in moved.winrates)
