"""A policy version against the base, judged by a rule: `rlhf eval-policy`."""

from __future__ import annotations

import json
import math

import pytest
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

    # Best-of-N of the base by a reward version, judged the same way.
    assert main([*base, "--best-of", "2"]) == 2
    assert "no reward model to pick with" in capsys.readouterr().err
    tiny_stack.ensure_adapter("reward")
    tiny_stack.save_adapter("reward", tmp_path / "r1")
    with Store(db_path) as store:
        store.add_checkpoint("reward", tmp_path / "r1", meta={"gain": 1.0, "bias": 0.0})
    assert main([*base, "--best-of", "2", "--version", "2"]) == 2
    assert "leave --version out" in capsys.readouterr().err
    assert main([*base, "--best-of", "3", "--json"]) == 0
    bon = json.loads(capsys.readouterr().out)
    assert (bon["best_of"], bon["reward"], bon["prompts"]) == (3, 1, 3)
    assert bon["kl"] == pytest.approx(math.log(3) - 2 / 3)


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


class RuleAsReward:
    """A reward model that is the rule itself: best-of-N must then pick the rule's favourite."""

    version = 3

    def __init__(self, rule):
        self.rule = rule
        self.seen: list[list[float]] = []

    def raw_ids(self, prompt_ids, completion_ids):
        scores = [self.rule("", ids, True) for ids in completion_ids]
        self.seen.append(scores)
        return torch.tensor(scores)


def test_best_of_n_answers_with_the_reward_models_favourite_and_reports_the_bound(tiny_stack):
    import math

    from rlhf.best_of import best_of_n_kl_bound
    from rlhf.evaluation import evaluate_best_of_n
    from rlhf.rules import parse_rule
    from rlhf.sampling import SamplingParams

    assert best_of_n_kl_bound(1) == 0.0
    assert best_of_n_kl_bound(4) == math.log(4) - 3 / 4
    with torch.no_grad():
        tiny_stack.peft.get_base_model().model.embed_tokens.weight.mul_(7.0)  # peaked, as in test_ppo
    rule, prompts = parse_rule("distinct"), ["Say hello.", "Name a colour.", "Count to three."]
    scorer = RuleAsReward(rule)
    result = evaluate_best_of_n(tiny_stack, scorer, prompts, rule, SamplingParams(max_new_tokens=6, seed=0), 4, k=2)
    # Each answer was the top of its four: its score is the pool's best of that group.
    assert len(scorer.seen) == 3 and all(len(s) == 8 for s in scorer.seen)
    best = [max(s[i:i + 4]) for s in scorer.seen for i in (0, 4)]
    assert result.policy_score == pytest.approx(sum(best) / len(best))
    assert result.winrate >= 0.5 and result.policy_score >= result.against_score
    assert (result.best_of, result.reward, result.kl) == (4, 3, best_of_n_kl_bound(4))
    assert result.line().startswith("best-of-4 (reward v3) vs v0 by rule:distinct")
    assert "(the best-of-N bound)" in result.line()
