"""The store: round trips, migrations, refusal of newer schemas, two writers."""

from __future__ import annotations

import hashlib
import multiprocessing
import sqlite3

import pytest

from rlhf.errors import UserError
from rlhf.migrations import SCHEMA_VERSION
from rlhf.preferences import record_label
from rlhf.store import Store


def _completion_rows(n: int) -> list[dict]:
    return [{"text": f"answer {i}", "token_ids": [10 + i, 2], "n_tokens": 2, "finish_reason": "eos",
             "policy_version": 0, "temperature": 0.7, "top_p": 0.95, "max_new_tokens": 64,
             "logprobs": [-1.5, -0.25]} for i in range(n)]


def test_round_trip_survives_reopen(db_path):
    with Store(db_path) as store:
        pid = store.add_prompt("Why is the sky blue?", source="test")
        ids = store.add_completions(pid, _completion_rows(3))
        cid = record_label(store, pid, ids, "best", [1], labeler="ana", seconds=4.5)

    with Store(db_path) as store:
        assert [p.text for p in store.prompts()] == ["Why is the sky blue?"]
        completions = store.completions(ids)
        assert [c.text for c in completions] == ["answer 0", "answer 1", "answer 2"]
        assert completions[0].token_ids == [10, 2]
        assert completions[0].logprobs == [-1.5, -0.25]
        assert completions[0].finish_reason == "eos"
        [comparison] = store.comparisons()
        assert comparison.id == cid
        assert comparison.completion_ids == ids and comparison.choice == [1]
        assert comparison.labeler == "ana" and comparison.seconds == 4.5
        pairs = {(p["chosen_id"], p["rejected_id"]) for p in store.pairs()}
        assert pairs == {(ids[1], ids[0]), (ids[1], ids[2])}


def test_duplicate_prompts_are_not_added_twice(store):
    assert store.add_prompts(["a", "b"]) == (2, 0)
    assert store.add_prompts(["b", "c"]) == (1, 1)
    assert [p.text for p in store.prompts()] == ["a", "b", "c"]


def test_migration_from_previous_version_keeps_data(db_path):
    with Store(db_path, migrate_to=SCHEMA_VERSION - 1) as old:
        assert old.schema_version == SCHEMA_VERSION - 1
        # Write as the previous release did: raw rows in its tables.
        old.db.execute("INSERT INTO prompts (text, created_at) VALUES ('p', 'then')")
        for text in ("x", "y"):
            old.db.execute("INSERT INTO completions (prompt_id, text, n_tokens, finish_reason, created_at) "
                           "VALUES (1, ?, 1, 'eos', 'then')", [text])
        old.db.execute("INSERT INTO comparisons (prompt_id, completion_ids, kind, choice, created_at) "
                       "VALUES (1, '[1, 2]', 'best', '[0]', 'then')")
        old.db.execute("INSERT INTO pairs (comparison_id, prompt_id, chosen_id, rejected_id, created_at) "
                       "VALUES (1, 1, 1, 2, 'then')")
        old.db.conn.commit()

    with Store(db_path) as store:
        assert store.schema_version == SCHEMA_VERSION
        [pair] = store.pairs()
        assert (pair["chosen"], pair["rejected"], pair["source"]) == ("x", "y", "label")
        assert store.comparisons()[0].purpose == "preference"
        job = store.create_job("reward", {"steps": 1})
        assert store.job(job).status == "queued"


def test_newer_schema_is_refused_and_left_untouched(db_path):
    with Store(db_path) as store:
        store.add_prompt("keep me")
        store.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        store.db.conn.commit()
        store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = hashlib.sha256(db_path.read_bytes()).hexdigest()

    with pytest.raises(UserError, match="newer version"):
        Store(db_path)
    assert hashlib.sha256(db_path.read_bytes()).hexdigest() == before


def test_a_file_that_is_not_a_database_gets_a_clear_error(tmp_path):
    path = tmp_path / "notes.db"
    path.write_text("this is not sqlite " * 100)
    with pytest.raises(UserError, match="not a workbench database"):
        Store(path)


def test_missing_folder_gets_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Store(tmp_path / "nowhere" / "w.db")


def _write_prompts(path: str, prefix: str, n: int) -> None:
    with Store(path) as store:
        for i in range(n):
            store.add_prompt(f"{prefix}-{i}")


def test_two_processes_write_the_same_database(db_path):
    Store(db_path).close()
    ctx = multiprocessing.get_context("spawn")
    other = ctx.Process(target=_write_prompts, args=(str(db_path), "other", 150))
    other.start()
    _write_prompts(str(db_path), "here", 150)
    other.join(60)
    assert other.exitcode == 0
    with Store(db_path) as store:
        assert len(store.prompts()) == 300


def test_wal_mode_and_busy_timeout(store):
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000


def test_second_active_job_is_refused(store):
    store.create_job("reward", {})
    with pytest.raises(UserError, match="already queued"):
        store.create_job("ppo", {})


def test_checkpoint_versions_count_up_per_kind(store, tmp_path):
    assert store.add_checkpoint("policy", tmp_path / "a") == 1
    assert store.add_checkpoint("policy", tmp_path / "b") == 2
    assert store.add_checkpoint("reward", tmp_path / "r", meta={"gain": 2.0}) == 1
    assert store.checkpoint("policy").path == str(tmp_path / "b")
    assert store.checkpoint("reward", 1).meta == {"gain": 2.0}
    with pytest.raises(UserError, match="no policy version 9"):
        store.checkpoint("policy", 9)


def test_labels_are_committed_as_they_are_made(db_path):
    """A label is visible to another connection at once: nothing waits for a close."""
    store = Store(db_path)
    pid = store.add_prompt("p")
    ids = store.add_completions(pid, _completion_rows(2))
    record_label(store, pid, ids, "best", [0])
    other = sqlite3.connect(db_path)
    assert other.execute("SELECT COUNT(*) FROM pairs").fetchone()[0] == 1
    other.close()
    store.close()
