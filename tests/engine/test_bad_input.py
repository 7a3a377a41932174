"""Bad input is one clear line, never a traceback, silent garbage or a lost row.

One test per case: each checks the message a user reads and that what the
database held is unchanged (its bytes, where the promise is "not touched").
No model is loaded: every refusal comes before one would be.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time

import pytest

from rlhf.cli import main
from rlhf.exchange_export import export_pairs
from rlhf.exchange_import import import_file
from rlhf.locking import AppLock
from rlhf.prompts import read_prompt_file
from rlhf.store import Store
from rlhf.text_input import MAX_TEXT_CHARS

MODEL = ["--model", "/nonexistent/model", "--device", "cpu"]  # never reached: refused before it loads


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse refuses a bad option value with exit 2
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(err: str) -> str:
    """The error line; fails on a traceback or a multi-line message."""
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if "error" in line]
    assert len(lines) == 1, err
    return lines[0]


def rows(db_path) -> dict[str, list]:
    """Every row of every table: 'unchanged' means exactly this."""
    conn = sqlite3.connect(db_path)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall() for t in tables}
    finally:
        conn.close()


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def filled(db_path):
    """A database with prompts and one imported pair."""
    with Store(db_path) as store:
        store.add_prompts(["What is rain?", "Tell a joke."], source="mine.txt")
        store.add_imported_pair("Name a color.", "Blue.", "Seven.", "import:a.jsonl", "key-1")
    return db_path


def write_jsonl(path, rows_: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows_), encoding="utf-8")


# --- data lost or changed ---------------------------------------------------------------


def test_line_separators_inside_texts_survive_export_and_import(store, tmp_path, db_path):
    texts = ["line\u2028separator", "paragraph\u2029separator", "next\u0085line"]
    for i, text in enumerate(texts):
        store.add_imported_pair(f"prompt {i} {text}", f"chosen {text}", f"rejected {i}", "import:x", f"k{i}")
    out = tmp_path / "pairs.jsonl"
    assert export_pairs(store, out, "trl", metadata=False) == 3
    with Store(tmp_path / "other.db") as other:
        report = import_file(other, out)
        assert (report.added, report.errors) == (3, [])
        assert sorted(p["chosen"] for p in other.pairs()) == sorted(f"chosen {t}" for t in texts)
    # A prompt file too: one prompt per line, and the line numbers of bad lines are right.
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a\u2028b"}, ensure_ascii=False) + "\nnot json\n", encoding="utf-8")
    parsed = read_prompt_file(prompts)
    assert parsed.prompts == ["a\u2028b"] and parsed.errors[0].startswith("p.jsonl:2:")


def test_newer_schema_in_rollback_mode_is_refused_byte_for_byte(capsys, db_path, tmp_path):
    with Store(db_path) as store:
        store.add_prompt("kept")
        store.db.execute("PRAGMA journal_mode = DELETE")
        store.db.execute("PRAGMA user_version = 999")
    before = digest(db_path)
    prompts = tmp_path / "p.txt"
    prompts.write_text("new prompt\n")
    for argv in (["stats"], ["prompts", "add", str(prompts)], ["import", str(prompts)]):
        code, _, err = run(capsys, "--db", str(db_path), *argv)
        assert code == 2 and "newer version" in one_line_error(err) and "not changed" in err
    assert digest(db_path) == before
    assert not (tmp_path / "workbench.db-wal").exists()


def hold_write_lock(db_path, seconds: float) -> threading.Thread:
    """Another writer: takes the write lock now, writes a prompt, commits after ``seconds``."""
    busy = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    busy.execute("BEGIN IMMEDIATE")
    busy.execute("INSERT INTO prompts (text, created_at) VALUES ('written meanwhile', 'now')")

    def commit_later() -> None:
        time.sleep(seconds)
        busy.execute("COMMIT")
        busy.close()

    writer = threading.Thread(target=commit_later)
    writer.start()
    return writer


def test_import_waits_for_another_writer_instead_of_failing(filled, tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [{"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(20)])
    with Store(filled) as store:
        writer = hold_write_lock(filled, 1.0)  # busy after the store opened, while the import runs
        report = import_file(store, path)
        writer.join()
        assert (report.added, report.errors) == (20, [])
        assert len(store.pairs(source="import")) == 21
        assert "written meanwhile" in [p.text for p in store.prompts()]


def test_a_database_locked_past_the_timeout_is_one_line_and_imports_nothing(capsys, filled, tmp_path,
                                                                            monkeypatch):
    import rlhf.database

    monkeypatch.setattr(rlhf.database, "BUSY_TIMEOUT_S", 0.3)
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [{"prompt": "q", "chosen": "yes", "rejected": "no"}])
    before = rows(filled)
    writer = hold_write_lock(filled, 2.0)
    code, _, err = run(capsys, "--db", str(filled), "import", str(path))
    # Reading needs no lock: stats answers while the other writer holds it.
    stats_code, stats_out, _ = run(capsys, "--db", str(filled), "stats", "--json")
    writer.join()
    assert code == 2 and "locked" in one_line_error(err) and "try again" in err
    assert stats_code == 0 and json.loads(stats_out)["pairs_imported"] == 1
    after = rows(filled)
    assert after["pairs"] == before["pairs"] and len(after["prompts"]) == len(before["prompts"]) + 1


def test_an_import_that_fails_midway_adds_nothing(filled):
    before = rows(filled)
    with Store(filled) as store, pytest.raises(sqlite3.IntegrityError):
        # The third pair breaks a NOT NULL constraint after two pairs were written.
        store.add_imported_pairs([("p1", "a", "b", "n1"), ("p2", "a", "b", "n2"), ("p3", None, "b", "n3")],
                                 "import:bad")
    assert rows(filled) == before


def test_a_prompt_of_mine_that_was_imported_joins_the_labeling_queue(capsys, filled, tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("Name a color.\nWhat is rain?\n")
    code, out, _ = run(capsys, "--db", str(filled), "prompts", "add", str(path))
    assert code == 0 and "added 1 prompts (1 already there" in out
    with Store(filled) as store:
        mine = {p.text: p.id for p in store.prompts()}
        assert "Name a color." in mine and mine["Name a color."] in store.unlabeled_prompt_ids()
        assert len(store.pairs(source="import")) == 1  # its imported pair stays


# --- one clear line instead of a traceback ----------------------------------------------


def test_db_that_is_a_folder_or_empty_is_one_line(capsys, tmp_path):
    for db, expected in ((str(tmp_path), "is a folder"), ("", "argument --db: the path is empty")):
        code, _, err = run(capsys, "--db", db, "stats")
        assert code == 2 and expected in one_line_error(err)
    assert list(tmp_path.iterdir()) == []


def test_new_database_in_an_unwritable_folder_is_one_line(capsys, tmp_path, monkeypatch):
    # Tests run as root, whom permissions do not stop; so the folder's answer is faked.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode))
    code, _, err = run(capsys, "--db", str(tmp_path / "new.db"), "init")
    assert code == 2 and "is not writable" in one_line_error(err)
    assert not (tmp_path / "new.db").exists()


def test_read_only_database_is_refused_before_a_write(capsys, filled, tmp_path, monkeypatch):
    before = rows(filled)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(filled) else real_access(p, mode))
    path = tmp_path / "p.txt"
    path.write_text("another\n")
    code, _, err = run(capsys, "--db", str(filled), "prompts", "add", str(path))
    assert code == 2 and "is read-only" in one_line_error(err)
    monkeypatch.undo()
    assert rows(filled) == before


def damage(db_path) -> None:
    """Garbage over the middle pages; the 100-byte header stays valid."""
    with Store(db_path) as store:
        store.add_prompts([f"prompt number {i} " + "x" * 200 for i in range(300)], source="bulk")
        store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(db_path.read_bytes())
    page = 4096
    for start in range(2 * page, len(data) - page, 3 * page):
        data[start:start + 64] = b"\xa5" * 64
    db_path.write_bytes(bytes(data))


def test_damaged_database_is_refused_untouched_with_the_way_to_recover(capsys, db_path, tmp_path):
    damage(db_path)
    before = digest(db_path)
    prompts = tmp_path / "p.txt"
    prompts.write_text("new prompt\n")
    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(pairs, [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    for argv in (["stats"], ["prompts", "list"], ["prompts", "add", str(prompts)], ["import", str(pairs)],
                 ["export", str(tmp_path / "out.jsonl")]):
        code, out, err = run(capsys, "--db", str(db_path), *argv)
        line = one_line_error(err)
        assert code == 2 and "is damaged" in line and ".recover" in line, argv
    assert digest(db_path) == before


@pytest.mark.parametrize("option", [["--k", "0"], ["--k", "-3"], ["--temperature", "0"], ["--top-p", "0"],
                                    ["--top-p", "1.5"], ["--max-new-tokens", "0"], ["--limit", "0"],
                                    ["--limit", "-1"], ["--temperature", "nan"]])
def test_bad_sampling_options_are_refused_before_the_model_loads(capsys, filled, option):
    before = rows(filled)
    code, _, err = run(capsys, "--db", str(filled), "sample", *option, *MODEL)
    assert code == 2 and f"argument {option[0]}" in one_line_error(err) and ("must be" in err or "not a finite" in err)
    assert "/nonexistent/model" not in err
    assert rows(filled) == before


@pytest.mark.parametrize("argv", [["ppo", "--iterations", "-2"], ["ppo", "--minutes", "-1"],
                                  ["ppo", "--iterations", "0"], ["label", "--rule", "short", "--limit", "-5"],
                                  ["eval-policy", "--rule", "short", "--limit", "0"]])
def test_counts_that_cannot_be_are_refused(capsys, filled, argv):
    before = rows(filled)
    code, _, err = run(capsys, "--db", str(filled), *argv, *MODEL)
    assert code == 2 and "must be" in err and "Traceback" not in err
    assert rows(filled) == before


# --- silent garbage ---------------------------------------------------------------------


def test_hh_transcript_without_an_assistant_turn_is_refused(store, tmp_path):
    path = tmp_path / "hh.jsonl"
    write_jsonl(path, [{"chosen": "\n\nHuman: What is a cat?\n\nHuman: Tell me.", "rejected": "\n\nHuman: What is a dog?"},
                       {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go."}])
    report = import_file(store, path)
    assert report.added == 1 and len(report.errors) == 1
    assert "hh.jsonl:1:" in report.errors[0] and "no shared" in report.errors[0]
    assert [p["prompt"] for p in store.pairs()] == ["\n\nHuman: Hi\n\nAssistant:"]


def test_a_byte_order_mark_is_dropped(store, tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_bytes("\ufeffWhat is rain?\nTell a joke.\n".encode())
    assert read_prompt_file(txt).prompts == ["What is rain?", "Tell a joke."]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_bytes("\ufeff".encode() + b'{"prompt": "first"}\n')
    assert read_prompt_file(jsonl).prompts == ["first"]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_bytes("\ufeff".encode() + b'{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    assert import_file(store, pairs).added == 1


def test_binary_and_control_characters_are_not_prompts(capsys, filled, tmp_path):
    before = rows(filled)
    binary = tmp_path / "blob.txt"
    binary.write_bytes(bytes(range(128)) * 40)  # valid UTF-8, all of it
    code, _, err = run(capsys, "--db", str(filled), "prompts", "add", str(binary))
    assert code == 2 and "binary" in one_line_error(err)
    assert rows(filled) == before
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("fine prompt\nbell \x07 here\n")
    parsed = read_prompt_file(mixed)
    assert parsed.prompts == ["fine prompt"] and "control character U+0007" in parsed.errors[0]


def test_one_size_limit_for_prompts_and_imported_texts(store, tmp_path):
    fits, too_long = "a" * MAX_TEXT_CHARS, "b" * (MAX_TEXT_CHARS + 1)
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"{fits}\n{too_long}\n")
    parsed = read_prompt_file(prompts)
    assert parsed.prompts == [fits] and f"the limit is {MAX_TEXT_CHARS}" in parsed.errors[0]
    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(pairs, [{"prompt": "q", "chosen": fits, "rejected": "short"},
                        {"prompt": "q", "chosen": too_long, "rejected": "short"},
                        {"prompt": too_long, "chosen": "x", "rejected": "y"}])
    report = import_file(store, pairs)
    assert report.added == 1 and len(report.errors) == 2
    assert all(f"the limit is {MAX_TEXT_CHARS}" in e for e in report.errors)


def test_pairs_that_differ_only_in_whitespace_are_not_preferences(store, tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [{"prompt": "q", "chosen": "Yes,  it is.\n", "rejected": "Yes, it is."},
                       {"prompt": "q", "chosen": "Yes.", "rejected": "No."}])
    report = import_file(store, path)
    assert report.added == 1 and "up to whitespace" in report.errors[0]


# --- smaller ---------------------------------------------------------------------------


def test_a_killed_job_is_not_active_and_rlhf_jobs_says_why(capsys, filled):
    with Store(filled) as store:
        job_id = store.create_job("reward", {})
        # This test's own process: alive, but not a job's, so the job is dead.
        store.update_job(job_id, status="running", pid=os.getpid(), step=3, total_steps=10)
    code, out, _ = run(capsys, "--db", str(filled), "stats", "--json")
    assert code == 0 and json.loads(out)["jobs_active"] == 0
    code, out, _ = run(capsys, "--db", str(filled), "jobs")
    assert code == 0
    assert f"job {job_id}  reward  failed" in out and "step 3/10" in out
    assert "ended without finishing" in out and f"job-{job_id}.log" in out


def test_the_app_lock_follows_the_file_not_the_name(tmp_path, db_path):
    Store(db_path).close()
    alias = tmp_path / "alias.db"
    alias.symlink_to(db_path)
    with AppLock(db_path), pytest.raises(Exception, match="already has"):
        AppLock(alias).acquire()


def test_a_mistyped_db_is_not_created(capsys, filled, tmp_path):
    typo = tmp_path / "workbnech.db"
    for argv in (["stats"], ["prompts", "list"], ["export", str(tmp_path / "o.jsonl")]):
        code, _, err = run(capsys, "--db", str(typo), *argv)
        assert code == 2 and "there is no database at" in one_line_error(err) and "rlhf" in err
    assert not typo.exists()


def test_import_shows_the_first_bad_rows_and_a_count(capsys, filled, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("not json\n" * 12 + json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    code, out, err = run(capsys, "--db", str(filled), "import", str(path))
    assert code == 0 and "imported 1 pairs" in out and "12 bad rows skipped" in out
    lines = err.strip().splitlines()
    assert len(lines) == 6 and lines[0].startswith("skipped bad.jsonl:1:") and lines[-1] == "... and 7 more skipped"


def test_a_folder_given_as_a_prompt_file_is_called_a_folder(capsys, filled, tmp_path):
    before = rows(filled)
    code, _, err = run(capsys, "--db", str(filled), "prompts", "add", str(tmp_path))
    assert code == 2 and "is a folder" in one_line_error(err)
    assert rows(filled) == before


def test_utf16_is_named_not_called_binary(capsys, filled, tmp_path):
    path = tmp_path / "windows.txt"
    path.write_bytes("What is rain?\r\n".encode("utf-16"))
    code, _, err = run(capsys, "--db", str(filled), "prompts", "add", str(path))
    assert code == 2 and "is UTF-16 text: save it as UTF-8" in one_line_error(err)


def test_export_warns_of_labeled_pairs_import_would_refuse(capsys, filled, tmp_path):
    with Store(filled) as store:
        pid = store.add_prompt("Say something short.")
        ids = store.add_completions(pid, [{"text": t, "n_tokens": 2, "finish_reason": "eos", "policy_version": 0}
                                          for t in ("Short.", "Short. ")])
        store.record_comparison(pid, ids, "best", [0], [(ids[0], ids[1])], labeler="me")
    out = tmp_path / "pairs.jsonl"
    code, stdout, err = run(capsys, "--db", str(filled), "export", str(out))
    assert code == 0 and "wrote 2 pairs" in stdout
    assert "warning: 1 exported pairs would be refused by `rlhf import`" in err and "whitespace" in err
