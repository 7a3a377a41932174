"""Every PPO rollout kept: stored per iteration with the version that sampled it,
listed and sorted, exported, and sent to the labeling queue."""

from __future__ import annotations

import json

import pytest
from conftest import PROMPTS
from test_ppo import job_config, run_in_process

from rlhf.cli import main
from rlhf.errors import UserError
from rlhf.rollout_archive import queue_rollouts
from rlhf.sampling import Sample


@pytest.fixture
def ppo_job(store, db_path, tiny_dir):
    """A 3-iteration session on the tiny model that saves every other iteration."""
    store.add_prompts(PROMPTS)
    job = run_in_process(store, db_path, job_config(tiny_dir, iterations=3, save_every=2))
    assert job.status == "done", job.error
    return job


def test_every_iteration_keeps_its_rollouts_with_the_version_that_sampled_them(store, ppo_job):
    assert store.rollout_iterations(ppo_job.id) == [1, 2, 3]
    rows = store.rollouts(ppo_job.id)
    assert len(rows) == 3 * 4  # batch size 4
    # Iteration 1 sampled the base (version 0); iteration 2 a policy ahead of every
    # saved version (iteration 1 was not saved); iteration 3 version 1, saved after 2.
    assert {r.iteration: r.policy_version for r in rows} == {1: 0, 2: None, 3: 1}
    scores = {m: v for m, v in store.metrics(ppo_job.id)["objective/scores"]}
    for iteration in (1, 2, 3):
        kept = store.rollouts(ppo_job.id, iteration)
        assert sum(r.score for r in kept) / len(kept) == pytest.approx(scores[iteration], abs=1e-5)
        assert all(r.prompt in PROMPTS and r.token_ids and r.n_tokens == len(r.token_ids) for r in kept)
    by_length = store.rollouts(ppo_job.id, sort="length")
    assert [r.n_tokens for r in by_length] == sorted((r.n_tokens for r in rows), reverse=True)
    assert [r.kl for r in store.rollouts(ppo_job.id, 3, sort="kl", limit=2)] == sorted(
        (r.kl for r in store.rollouts(ppo_job.id, 3)), reverse=True)[:2]


def test_rollouts_are_listed_and_exported(store, db_path, ppo_job, tmp_path, capsys):
    assert main(["--db", str(db_path), "rollouts", "--iteration", "3", "--sort", "score"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["iter", "ver", "score"] and len(lines) == 1 + 4
    listed = [float(line.split()[2]) for line in lines[1:]]
    assert listed == sorted(listed, reverse=True)

    out = tmp_path / "rollouts.jsonl"
    assert main(["--db", str(db_path), "export", str(out), "--rollouts"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 12 and [r["iteration"] for r in records] == [1] * 4 + [2] * 4 + [3] * 4
    assert {"job_id", "policy_version", "prompt", "completion", "score", "spread", "kl", "n_tokens",
            "finish_reason"} <= set(records[0])
    assert main(["--db", str(db_path), "export", str(tmp_path / "r.parquet"), "--rollouts"]) == 2
    assert "rollouts are written as JSONL" in capsys.readouterr().err


def test_an_iteration_queued_for_labeling_waits_as_sets_of_k(store, ppo_job):
    asked = []

    def sample_more(prompt: str, version: int, n: int) -> list[Sample]:
        asked.append((prompt, version, n))
        return [Sample(text=f"more {i}", token_ids=[5, i + 6], logprobs=[-1.0, -1.0], finish_reason="length")
                for i in range(n)]

    before = len(store.pending_sets(4))
    sets, sampled = queue_rollouts(store, ppo_job.id, 3, 4, sample_more)
    rollouts = store.rollouts(ppo_job.id, 3)
    prompts = {r.prompt for r in rollouts}
    assert sets == len(prompts) and sampled == 4 * len(prompts) - len(rollouts)
    assert {version for _, version, _ in asked} == {1}  # the version that sampled iteration 3
    waiting = store.pending_sets(4)[before:]
    assert len(waiting) == len(prompts)
    for prompt_id, completions in waiting:
        assert len(completions) == 4 and {c.policy_version for c in completions} == {1}
        assert store.prompt(prompt_id).text in prompts
    shown = {c.text for _, completions in waiting for c in completions}
    assert {r.completion for r in rollouts} <= shown
    # The policy that sampled iteration 2 was never saved: nothing to sample more from.
    with pytest.raises(UserError, match="never saved as a version"):
        queue_rollouts(store, ppo_job.id, 2, 4, sample_more)
    with pytest.raises(UserError, match="kept no rollouts of iteration 9"):
        queue_rollouts(store, ppo_job.id, 9, 4, sample_more)


def test_no_session_no_rollouts_is_one_line(cli_db, capsys):
    assert main(["--db", str(cli_db), "rollouts"]) == 2
    assert "no PPO session" in capsys.readouterr().err


def test_the_cli_queues_an_iteration_sampling_from_its_version(store, db_path, ppo_job, tiny_dir, capsys):
    assert main(["--db", str(db_path), "rollouts", "--queue", "--iteration", "1", "--k", "3",
                 "--model", tiny_dir, "--no-4bit"]) == 0
    assert "queued 4 sets of iteration 1" in capsys.readouterr().out
    waiting = [completions for _, completions in store.pending_sets(3) if len(completions) == 3]
    assert len(waiting) >= 4 and all(c.policy_version == 0 and c.token_ids for c in waiting[-1])
    assert main(["--db", str(db_path), "rollouts", "--queue"]) == 2
    assert "--queue needs --iteration" in capsys.readouterr().err
