"""The reward model: its loss, reading at EOS, learning a synthetic labeler,
normalization, and training as a background job (cancel, kill, one at a time)."""

from __future__ import annotations

import math
import os
import random
import re
import signal
import time

import pytest
import torch

from conftest import WORDS, synthetic_pairs

from rlhf import jobs
from rlhf.chat import chat_prompt_ids
from rlhf.database import now
from rlhf.errors import UserError
from rlhf.preferences import record_label
from rlhf.reward_config import RewardConfig
from rlhf.reward_data import Element, split_by_prompt, store_elements
from rlhf.reward_eval import agreement, disagreements, score_labeled_pairs
from rlhf.reward_loss import bradley_terry_loss, element_loss
from rlhf.reward_scoring import RewardScorer, load_scorer, raw_rewards
from rlhf.reward_train import plan_steps, train
from rlhf.sampling import SamplingParams, sample_k
from rlhf.store import Store

# --- the loss -----------------------------------------------------------------------


def test_bradley_terry_loss_on_two_hand_worked_pairs():
    # Pair 1: r_c - r_r = 1 -> -log σ(1) = log(1 + e^-1) = 0.313262
    # Pair 2: r_c - r_r = 0 -> -log σ(0) = log 2       = 0.693147
    expected = (math.log(1 + math.exp(-1)) + math.log(2)) / 2  # 0.503204
    loss = bradley_terry_loss(torch.tensor([1.0, 0.5]), torch.tensor([0.0, 0.5]))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.503204, abs=1e-6)


def test_best_of_k_softmax_and_ranking_losses():
    rewards = torch.tensor([2.0, 0.0, 0.0])
    best = Element("p", [[1]] * 3, [(0, 1), (0, 2)], kind="best")
    # softmax: -log(e^2 / (e^2 + 1 + 1)) = log(1 + 2 e^-2)
    assert element_loss(rewards, best, "softmax").item() == pytest.approx(math.log(1 + 2 * math.exp(-2)), abs=1e-6)
    # pairwise: both pairs have margin 2 -> log(1 + e^-2)
    assert element_loss(rewards, best, "pairwise").item() == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-6)
    # a ranking 0 > 1 > 2 with rewards (2, 0, 0): margins 2, 2, 0, averaged
    ranking = Element("p", [[1]] * 3, [(0, 1), (0, 2), (1, 2)], kind="ranking")
    expected = (2 * math.log(1 + math.exp(-2)) + math.log(2)) / 3
    assert element_loss(rewards, ranking, "softmax").item() == pytest.approx(expected, abs=1e-6)
    # 0 and 2 share the top over 1 and 3: each winner is one choice among itself and the losers
    shared = Element("p", [[1]] * 4, [(0, 1), (0, 3), (2, 1), (2, 3)], kind="best")
    rewards = torch.tensor([2.0, 0.0, 1.0, 0.0])
    expected = (math.log(1 + 2 * math.exp(-2)) + math.log(1 + 2 * math.exp(-1))) / 2
    assert element_loss(rewards, shared, "softmax").item() == pytest.approx(expected, abs=1e-6)


def test_all_elements_at_once_lose_what_each_loses_alone():
    """Comparisons computes the losses and margins of many elements in a few tensor
    operations; each element's loss is still element_loss (its definition)."""
    from rlhf.reward_loss import Comparisons, pair_margins

    elements = [Element("a", [[1]] * 3, [(1, 0), (1, 2)], kind="best", lengths=[1] * 3),
                Element("b", [[1]] * 3, [(2, 0), (2, 1), (0, 1)], kind="ranking", lengths=[1] * 3),
                Element("c", [[1]] * 2, [(0, 1)], kind="pair", lengths=[1] * 2),
                Element("d", [[1]] * 4, [(3, 0), (3, 1), (3, 2)], kind="best", lengths=[1] * 4),
                Element("e", [[1]] * 4, [(1, 0), (1, 2), (3, 0), (3, 2)], kind="best", lengths=[1] * 4)]
    rewards = torch.tensor([0.3, 1.2, -0.5, 0.0, 2.0, 0.7, 0.1, -0.2, 0.4, 0.9, -1.0, 1.5, 0.2, -0.3, 0.8, 0.5])
    for best_of_k in ("softmax", "pairwise"):
        layout, offset, alone = Comparisons(elements, best_of_k), 0, []
        for e in elements:
            alone.append(element_loss(rewards[offset:offset + len(e.sequences)], e, best_of_k))
            offset += len(e.sequences)
        assert layout.loss(rewards).item() == pytest.approx(torch.stack(alone).mean().item(), abs=1e-6)
    offsets = [0, 3, 6, 8, 12]
    expected = torch.cat([pair_margins(rewards[o:o + len(e.sequences)], e) for o, e in zip(offsets, elements)])
    assert torch.allclose(Comparisons(elements).margins(rewards), expected)


def test_one_epoch_shows_every_element_once_in_accumulated_steps():
    items = [Element(f"p{i}", [[i]], []) for i in range(10)]
    plan = plan_steps(items, RewardConfig(batch_size=3, accum=2, epochs=1), random.Random(0))
    assert [len(step) for step in plan] == [2, 2]  # 4 micro-batches of 3, 3, 3, 1
    seen = [e.prompt for step in plan for batch in step for e in batch]
    assert sorted(seen) == sorted(e.prompt for e in items)
    fixed = plan_steps(items, RewardConfig(batch_size=3, accum=2, steps=5), random.Random(0))
    assert len(fixed) == 5 and all(len(step) == 2 for step in fixed)


def test_config_rejects_bad_values():
    with pytest.raises(UserError, match="sources"):
        RewardConfig(sources="everything")
    with pytest.raises(UserError, match="unknown reward config"):
        RewardConfig.from_dict({"learning_rate": 1.0})


# --- data ----------------------------------------------------------------------------


def test_ranking_is_one_element_and_split_is_by_prompt(store, tiny_stack):
    for i in range(6):
        pid = store.add_prompt(f"prompt {i}")
        cids = store.add_completions(pid, [{"text": t, "n_tokens": 1, "finish_reason": "eos", "policy_version": 0}
                                           for t in ("a", "b", "c")])
        record_label(store, pid, cids, "ranking", [2, 0, 1])
        store.add_imported_pair(f"prompt {i}", "yes", "no", "file", f"key{i}")
    elements = store_elements(store, tiny_stack.tokenizer)
    ranking = [e for e in elements if e.kind == "ranking"]
    assert len(ranking) == 6 and all(len(e.sequences) == 3 and len(e.pairs) == 3 for e in ranking)
    eos = tiny_stack.tokenizer.eos_token_id
    assert all(s[-1] == eos and s.count(eos) >= 1 for e in elements for s in e.sequences)
    train_set, held = split_by_prompt(elements, 0.3)
    assert held and train_set
    assert not {e.prompt for e in train_set} & {e.prompt for e in held}
    assert split_by_prompt(elements, 0.3) == (train_set, held)  # deterministic
    assert len(store_elements(store, tiny_stack.tokenizer, sources="import")) == 6


# --- scoring at EOS ------------------------------------------------------------------


def test_score_is_read_at_eos(tiny_stack):
    tiny_stack.ensure_adapter("reward")
    scorer = RewardScorer(tiny_stack)
    tok = tiny_stack.tokenizer
    prompt = chat_prompt_ids(tok, "Tell me a story")
    body = tok("Once upon a time", add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    rows = [body + [eos], body, body + [eos] + tok(" and more", add_special_tokens=False)["input_ids"],
            body + [eos, tok.pad_token_id, tok.pad_token_id]]
    scores = scorer.score_ids([prompt] * 4, rows, [True] * 4)
    assert torch.allclose(scores, scores[0].expand(4), atol=1e-5)  # appended EOS; nothing after it counts
    # The same sequence scores the same alone and beside a longer one (padding).
    long = prompt + tok("a much longer completion than the other one", add_special_tokens=False)["input_ids"] + [eos]
    n = len(body) + 1
    with tiny_stack.role("reward"), torch.no_grad():
        alone = raw_rewards(tiny_stack, [prompt + body + [eos]], [n], scorer.readout)
        batched = raw_rewards(tiny_stack, [prompt + body + [eos], long], [n, len(long) - len(prompt)], scorer.readout)
    assert alone[0].item() == pytest.approx(batched[0].item(), abs=1e-5)
    # A different completion scores differently (the read is not the prompt's end).
    other = scorer.score_ids([prompt], [tok("No.", add_special_tokens=False)["input_ids"]], [True])
    assert other[0].item() != pytest.approx(scores[0].item(), abs=1e-6)
    # Never finished: still the model's opinion, read at an appended EOS as in
    # training (a penalty is PPO's setting, rlhf.ppo_math.penalize_missing_eos).
    assert scorer.score_ids([prompt], [body], [False])[0].item() == pytest.approx(scores[0].item(), abs=1e-5)
    gained = RewardScorer(tiny_stack, gain=2.0, bias=0.5).score_texts("Tell me a story", ["Once upon a time"])
    assert gained[0] == pytest.approx(2.0 * scores[0].item() + 0.5, abs=1e-4)


# --- learning -------------------------------------------------------------------------


def test_learns_a_synthetic_labeler_on_held_out_prompts(store, tiny_stack):
    synthetic_pairs(store, 48)
    elements = store_elements(store, tiny_stack.tokenizer)
    config = RewardConfig(finetune=True, epochs=2, lr=2e-3, batch_size=8, accum=1, eval_fraction=0.25, eval_every=3)
    logged: dict[int, dict[str, float]] = {}
    result = train(tiny_stack, elements, config, log=lambda step, m: logged.__setitem__(step, m))
    assert result.n_eval >= 6
    assert result.eval.accuracy >= 0.9, result
    assert result.eval.margin > 0
    last = logged[result.steps]
    assert {"loss", "accuracy", "margin", "lr", "eval/accuracy", "eval/margin"} <= set(last)
    assert logged[1]["lr"] > last["lr"]  # decaying
    assert last["loss"] < logged[1]["loss"]
    # Agreement and disagreements use the same scores.
    scorer = RewardScorer(tiny_stack)
    scored = score_labeled_pairs(scorer, store, source="import")
    assert agreement(scored) >= 0.9
    wrong = disagreements(scored)
    assert all(w.margin <= 0 for w in wrong)
    assert [w.margin for w in wrong] == sorted(w.margin for w in wrong)


def test_renormalization_gives_reference_samples_mean_zero_std_one(tiny_stack):
    tiny_stack.ensure_adapter("reward")
    prompts = ["Name a colour.", "Say hello.", "Count to three.", "What is a tree?"]
    torch.manual_seed(3)
    samples = sample_k(tiny_stack, prompts, 4, SamplingParams(max_new_tokens=8), role="reference")
    flat = [(p, s) for p, group in zip(prompts, samples) for s in group]
    rows = [chat_prompt_ids(tiny_stack.tokenizer, p) for p, _ in flat], [s.token_ids for _, s in flat]
    scorer = RewardScorer(tiny_stack, gain=3.0, bias=-2.0)  # as a reward version was normalized
    norm = scorer.renormalize(scorer.score_ids(*rows, [True] * len(flat)))
    assert norm.n_samples == 16 and norm.raw_std > 0
    # The same samples scored again through the public scorer: mean 0, std 1.
    scores = scorer.score_ids(*rows, [True] * len(flat))
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert scores.std().item() == pytest.approx(1.0, abs=1e-4)


# --- as a background job -----------------------------------------------------------------


def job_config(tiny_dir, **settings):
    """Reward training on the tiny model, as the job's row holds it."""
    return tiny_reward_job(tiny_dir, lr=2e-3, batch_size=8, accum=1, eval_fraction=0.25, eval_every=2, **settings)


def tiny_reward_job(tiny_dir, **settings):
    from rlhf.model_options import ModelOptions
    from rlhf.reward_config import RewardConfig, RewardJob

    return RewardJob(model=ModelOptions(source=tiny_dir, quantize=False, device="cpu"),
                     reward=RewardConfig(**settings)).to_dict()


def wait_for_step(store, job_id, step, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = store.job(job_id)
        if job.step >= step:
            return job
        assert job.status in ("queued", "running"), job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not reach step {step}")


def test_second_job_refused_and_cancel_stops_within_one_step(store, tiny_dir):
    synthetic_pairs(store, 16)
    job_id = jobs.start_job(store, "reward", job_config(tiny_dir, steps=100000))
    wait_for_step(store, job_id, 2)
    with pytest.raises(UserError, match="already"):
        jobs.start_job(store, "reward", job_config(tiny_dir))
    requested_at = now()
    jobs.request(store, job_id, "cancel")
    job = jobs.wait(store, job_id, timeout_s=60)
    assert job.status == "cancelled"
    after = store._rows("SELECT DISTINCT step FROM metrics WHERE job_id = ? AND created_at > ?", [job_id, requested_at])
    assert len(after) <= 1, after  # at most the step that was under way
    assert store.checkpoint("reward") is None


def test_killed_job_is_reported_failed_and_a_new_one_trains_a_version(store, tiny_dir, tiny_stack):
    synthetic_pairs(store, 24)
    labels_before = store.pairs()
    job_id = jobs.start_job(store, "reward", job_config(tiny_dir, steps=100000))
    job = wait_for_step(store, job_id, 1)
    os.kill(job.pid, signal.SIGKILL)
    job = jobs.wait(store, job_id, timeout_s=30)
    assert job.status == "failed" and "ended without finishing" in job.error
    assert store.checkpoint("reward") is None

    second = jobs.start_job(store, "reward", job_config(tiny_dir, epochs=2))
    job = jobs.wait(store, second, timeout_s=120)
    assert job.status == "done", job.error
    checkpoint = store.checkpoint("reward")
    assert checkpoint.version == 1 and checkpoint.job_id == second
    assert {"gain", "bias", "eval_accuracy"} <= set(checkpoint.meta)
    metrics = store.metrics(second)
    assert {"loss", "accuracy", "margin", "lr", "eval/accuracy", "eval/margin"} <= set(metrics)
    assert len(metrics["loss"]) == job.total_steps == job.step
    scorer = load_scorer(tiny_stack, store)
    assert scorer.version == 1 and scorer.gain == checkpoint.meta["gain"]
    assert len(scorer.score_texts("Question 1: say something", ["red banana sky", "red apple sky"])) == 2
    assert store.pairs() == labels_before  # the jobs only read labels


# --- the command line ---------------------------------------------------------------------


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    from rlhf.cli import main

    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_train_reward_without_pairs_is_refused_before_any_job(capsys, cli_db):
    code, _, err = run_cli(capsys, "--db", str(cli_db), "train-reward", "--sources", "label")
    assert code == 2 and "no labeled preference pairs to train on" in err
    with Store(cli_db) as store:
        assert store.jobs() == []


def test_eval_reward_without_a_model_is_one_clear_line(capsys, cli_db, tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    code, _, err = run_cli(capsys, "--db", str(cli_db), "eval-reward", str(path))
    assert code == 2 and "no reward model yet" in err and err.count("\n") == 1


def test_train_reward_follows_the_job_then_eval_reward_reads_a_file(capsys, db_path, tiny_dir, tmp_path):
    import json

    with Store(db_path) as store:
        synthetic_pairs(store, 24)
        # Imported pairs only: nothing sampled, so normalization must not need prompts to sample.
        assert {p["chosen_finish"] for p in store.pairs()} == {"imported"}
    model = ["--model", tiny_dir, "--no-4bit", "--device", "cpu"]
    code, out, err = run_cli(capsys, "--db", str(db_path), "train-reward", "--finetune", "--epochs", "3", "--lr", "2e-3",
                             "--batch-size", "8", "--accum", "1", "--eval-every", "2", "--eval-fraction", "0.25",
                             *model)
    assert code == 0, err
    assert "started reward job 1" in out and re.search(r"step \d+/\d+  loss", out) and "held-out accuracy" in out
    assert "reward version 1 saved" in out

    # A file in TRL's standard format, the synthetic labeler's taste, never imported.
    rng = random.Random(7)
    path = tmp_path / "prefs.jsonl"
    with path.open("w") as f:
        for i in range(12):
            a, b = rng.choices(WORDS, k=5), rng.choices(WORDS, k=5)
            a.insert(2, "banana")
            b.insert(2, rng.choice(WORDS))
            row = {"prompt": f"Other question {i}", "chosen": " ".join(a), "rejected": " ".join(b)}
            f.write(json.dumps(row) + "\n")
        f.write("not json\n")
    with Store(db_path) as store:
        pairs_before = len(store.pairs())
    code, out, err = run_cli(capsys, "--db", str(db_path), "eval-reward", str(path), *model)
    assert code == 0, err
    assert "reward version 1: accuracy" in out and "on 12 pairs" in out
    accuracy = float(out.split("accuracy ")[1].split(",")[0])
    assert accuracy >= 0.75
    assert "skipped" in err and ":13:" in err
    assert "scored 12/12 pairs" in err  # progress while it scores
    with Store(db_path) as store:
        assert len(store.pairs()) == pairs_before  # evaluated, not imported


def test_length_grouped_evaluation_keeps_each_pair_its_own_margin(tiny_stack):
    from rlhf.exchange_import import PreferencePair
    from rlhf.reward_eval import evaluate_texts

    rng = random.Random(3)
    def words() -> str:
        return " ".join(rng.choices(WORDS, k=rng.randrange(1, 40)))   # lengths vary: batches are length-grouped

    pairs = [PreferencePair(f"Q{i}" + " more" * rng.randrange(30), words(), words()) for i in range(10)]
    tiny_stack.ensure_adapter("reward")
    scorer = RewardScorer(tiny_stack, batch_size=4)
    seen: list[tuple[int, int]] = []
    result = evaluate_texts(scorer, pairs, progress=lambda done, total: seen.append((done, total)))
    one_by_one = [scorer.score_texts(p.prompt, [p.chosen, p.rejected]) for p in pairs]
    margins = torch.tensor([a - b for a, b in one_by_one])
    assert result.n_pairs == 10 and result.margin == pytest.approx(margins.mean().item(), abs=1e-4)
    assert result.accuracy == pytest.approx((margins > 0).float().mean().item())
    assert seen[-1] == (10, 10) and [d for d, _ in seen] == sorted(d for d, _ in seen)


# --- a few dozen labels --------------------------------------------------------------------


def rule_labeled_store(store, n_prompts: int, seed: int = 0) -> None:
    """Sets of four five-word completions, sampled for ``n_prompts`` prompts and
    labeled by the scripted labeler with the taste "contains banana"."""
    from rlhf.preferences import label_by_rule
    from rlhf.rules import parse_rule

    rng = random.Random(seed)
    for i in range(n_prompts):
        pid = store.add_prompt(f"Question {i}: say something")
        texts = [rng.choices(WORDS, k=5) for _ in range(4)]
        texts[rng.randrange(4)][rng.randrange(5)] = "banana"
        store.add_completions(pid, [{"text": " ".join(t), "n_tokens": 6, "finish_reason": "eos",
                                     "policy_version": 0, "temperature": 0.7, "top_p": 1.0,
                                     "max_new_tokens": 64} for t in texts])
    assert label_by_rule(store, parse_rule("contains=banana"), k=4) == {"best": n_prompts}


def test_a_few_dozen_rule_labels_train_a_reward_model_that_beats_chance_held_out(store, db_path, tiny_dir):
    """36 best-of-4 labels, the job's defaults but for the tiny model's learning
    rate: epochs are chosen on the held-out split, whose accuracy is reported with
    its count; the version records how its completions were sampled and the
    length check."""
    rule_labeled_store(store, 36)
    job_id = store.create_job("reward", tiny_reward_job(tiny_dir, lr=2e-3, sources="label"))
    jobs.run(db_path, job_id)
    job = store.job(job_id)
    assert job.status == "done", job.error
    meta = store.checkpoint("reward").meta
    assert meta["eval_pairs"] >= 15 and meta["eval_accuracy"] >= 0.8, meta
    assert meta["epochs"] > 1  # one epoch of 36 labels is 4 steps: not enough
    assert meta["sampling"] == {"temperature": 0.7, "top_p": 1.0, "max_new_tokens": 64}
    assert meta["length_pairs"] <= 36 * 3 and "length_corr" in meta and "labels_prefer_longer" in meta
    assert meta["readout"] == {"layer": 1, "pool": "mean"}  # a third of the tiny model's two layers
    metrics = store.metrics(job_id)
    assert {"eval/loss", "epoch"} <= set(metrics)


def test_a_trained_version_is_saved_before_a_later_step_can_fail(store, db_path, tiny_dir, monkeypatch):
    import rlhf.reward

    synthetic_pairs(store, 12)

    def broken(*args, **kwargs):
        raise RuntimeError("the scoring pass after training failed")

    monkeypatch.setattr(rlhf.reward, "completion_scores", broken)
    job_id = store.create_job("reward", tiny_reward_job(tiny_dir, steps=2))
    assert jobs.run(db_path, job_id) == 1
    assert "scoring pass after training failed" in store.job(job_id).error
    saved = store.checkpoint("reward")
    assert saved is not None and saved.job_id == job_id and saved.meta["steps"] == 2
    assert "gain" not in saved.meta  # scored with gain 1, bias 0 until normalized


def test_early_stopping_keeps_the_best_held_out_state(store, tiny_stack):
    """Labels the model cannot generalize from (a random taste): the held-out loss
    stops improving, training ends before its last epoch, and the state kept is
    the one with the best held-out loss."""
    from rlhf.reward_eval import evaluate_elements

    rng = random.Random(1)
    for i in range(30):
        store.add_imported_pair(f"Question {i}", " ".join(rng.choices(WORDS, k=5)),
                                " ".join(rng.choices(WORDS, k=5)), "noise", f"n{i}")
    elements = store_elements(store, tiny_stack.tokenizer)
    config = RewardConfig(lr=3e-2, max_epochs=500, patience=5, eval_fraction=0.3, ensemble=1)
    losses: list[float] = []
    result = train(tiny_stack, elements, config,
                   log=lambda step, m: losses.append(m["eval/loss"]) if "eval/loss" in m else None)
    assert result.stopped_early and result.epochs < 500
    assert result.eval.loss == pytest.approx(min(losses), abs=1e-6)
    _, held_out = split_by_prompt(elements, config.eval_fraction)
    assert evaluate_elements(tiny_stack, held_out, result.readout).loss == pytest.approx(min(losses), abs=1e-4)
    # An ensemble stops once no head's out-of-bag loss improves, each head at its best.
    bagged = train(tiny_stack, elements, RewardConfig(lr=3e-2, max_epochs=500, patience=5, ensemble=4),
                   log=lambda step, m: losses.append(m["eval/loss"]))
    assert bagged.stopped_early and bagged.epochs < 500
    assert bagged.eval.loss <= min(losses[-bagged.steps:]) + 1e-6


# --- the ensemble of heads ----------------------------------------------------------------


def test_out_of_bag_judges_each_comparison_by_the_heads_that_never_saw_its_prompt():
    from rlhf.reward_ensemble import bootstrap_counts, out_of_bag
    from rlhf.reward_loss import Comparisons

    two = dict(sequences=[[1]] * 2, pairs=[(0, 1)], lengths=[1, 1])
    counts = bootstrap_counts([Element(p, **two) for p in ("a", "a", "b", "c")], 50, seed=0)
    assert counts.shape == (50, 4)
    assert torch.equal(counts[:, 0], counts[:, 1])        # a prompt's comparisons are drawn together
    assert (counts[:, [0, 2, 3]].sum(1) == 3).all()        # each resample draws as many prompts as there are
    assert (counts == 0).any()                             # and leaves some out

    layout = Comparisons([Element(p, **two) for p in ("a", "b", "c")])
    counts = torch.tensor([[1.0, 0.0, 2.0],                # head 0 left out b
                           [0.0, 1.0, 2.0]])               # head 1 left out a; c is in every resample
    rewards = torch.tensor([[9.0, 1.0], [0.0, 0.0],        # a: head 1 says +1 (head 0 saw it: ignored)
                            [0.0, 9.0], [2.0, 0.0],        # b: head 0 says -2
                            [0.0, 0.0], [9.0, 9.0]])       # c: judged by no one
    result = out_of_bag(layout, rewards, counts)
    assert (result.accuracy, result.n_pairs, result.margin) == (0.5, 2, -0.5)
    assert result.loss == pytest.approx((math.log(1 + math.exp(-1)) + math.log(1 + math.exp(2))) / 2, abs=1e-6)


def test_an_ensemble_trains_on_every_label_and_its_version_scores_with_the_heads_mean(store, tiny_stack, tiny_dir,
                                                                                      tmp_path):
    from rlhf.model_options import ModelOptions
    from rlhf.models import load_stack
    from rlhf.reward_scoring import head_rewards

    synthetic_pairs(store, 48)
    elements = store_elements(store, tiny_stack.tokenizer)
    config = RewardConfig(lr=1e-2, max_epochs=400, patience=20, ensemble=5)
    logged: dict[int, dict[str, float]] = {}
    result = train(tiny_stack, elements, config, log=lambda step, m: logged.__setitem__(step, m))
    assert result.n_train == len(elements)                   # nothing set aside
    assert result.n_eval > len(elements) // 2                # most prompts left out by some head
    assert result.eval.n_pairs >= result.n_eval and result.eval.accuracy >= 0.9, result
    assert {"loss", "eval/accuracy", "eval/loss"} <= set(logged[1])
    assert tiny_stack.reward_head.out_features == 5

    sequences = [s for e in elements for s in e.sequences]
    lengths = [n for e in elements for n in e.lengths]
    readout = result.readout
    heads = head_rewards(tiny_stack, sequences, lengths, readout)
    assert heads.std(1).mean() > 0                            # the resamples disagree somewhat
    tiny_stack.save_adapter("reward", tmp_path / "ensemble")
    fresh = load_stack(ModelOptions(source=tiny_dir, quantize=False, device="cpu", dtype="float32"))
    fresh.load_adapter("reward", tmp_path / "ensemble")
    assert fresh.reward_head.out_features == 5
    with fresh.role("reward"):
        mean = raw_rewards(fresh, sequences, lengths, readout)
    assert torch.allclose(mean, heads.mean(1), atol=1e-4)

    train(tiny_stack, elements, RewardConfig(lr=1e-2, max_epochs=20, ensemble=1))
    assert tiny_stack.reward_head.out_features == 1          # one head after five
    tiny_stack.load_adapter("reward", tmp_path / "ensemble")
    assert tiny_stack.reward_head.out_features == 5
