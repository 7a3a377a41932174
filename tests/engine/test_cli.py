"""The headless CLI: one-line errors, bad lines reported, sampling into the store."""

from __future__ import annotations

import json

from rlhf.cli import main
from rlhf.store import Store


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_init_loads_the_sample_prompts(capsys, db_path):
    code, out, _ = run(capsys, "--db", str(db_path), "init")
    assert code == 0 and "ready" in out
    code, out, _ = run(capsys, "--db", str(db_path), "stats", "--json")
    stats = json.loads(out)
    assert stats["prompts"] >= 50 and stats["schema_version"] >= 1


def test_missing_prompt_file_is_one_clear_line(capsys, cli_db):
    code, out, err = run(capsys, "--db", str(cli_db), "prompts", "add", "no-such-file.txt")
    assert code == 2
    assert err.strip().count("\n") == 0
    assert "no-such-file.txt does not exist" in err and "Traceback" not in err


def test_malformed_jsonl_lines_are_reported_and_good_ones_kept(capsys, cli_db, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "first"}\n{"prompt": "second"\n\n{"text": "no prompt field"}\n{"prompt": "third"}\n')
    code, out, err = run(capsys, "--db", str(cli_db), "prompts", "add", str(path))
    assert code == 0
    assert "prompts.jsonl:2: not valid JSON" in err
    assert "prompts.jsonl:4:" in err and '"prompt"' in err
    assert "added 2 prompts" in out
    with Store(cli_db) as store:
        assert [p.text for p in store.prompts()] == ["first", "third"]


def test_text_prompt_files_skip_comments_and_blank_lines(capsys, cli_db, tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# my prompts\nWhat is rain?\n\n  Tell a joke.  \n")
    assert run(capsys, "--db", str(cli_db), "prompts", "add", str(path))[0] == 0
    with Store(cli_db) as store:
        assert [p.text for p in store.prompts()] == ["What is rain?", "Tell a joke."]


def test_sample_records_k_completions_per_prompt(capsys, cli_db, tmp_path, tiny_dir):
    path = tmp_path / "p.txt"
    path.write_text("one\ntwo\nthree\n")
    run(capsys, "--db", str(cli_db), "prompts", "add", str(path))
    code, out, _ = run(capsys, "--db", str(cli_db), "sample", "--k", "3", "--limit", "2",
                       "--model", tiny_dir, "--no-4bit", "--device", "cpu", "--max-new-tokens", "4", "--seed", "0")
    assert code == 0 and "recorded 6 completions for 2 prompts" in out
    with Store(cli_db) as store:
        prompts = store.prompts()
        assert [len(store.completions_for_prompt(p.id)) for p in prompts] == [3, 3, 0]
        c = store.completions_for_prompt(prompts[0].id)[0]
        assert c.policy_version == 0 and c.finish_reason in ("eos", "length")
        assert len(c.logprobs) == c.n_tokens


def test_sample_with_no_prompts_says_what_to_do(capsys, cli_db):
    code, _, err = run(capsys, "--db", str(cli_db), "sample", "--model", "whatever")
    assert code == 2 and "rlhf prompts add" in err


def test_missing_model_path_is_one_clear_line(capsys, db_path, tmp_path):
    Store(db_path).add_prompt("p")
    code, _, err = run(capsys, "--db", str(db_path), "sample", "--model", str(tmp_path / "nope"))
    assert code == 2 and "does not exist" in err and "Traceback" not in err


def test_newer_database_is_refused_by_the_cli(capsys, db_path):
    with Store(db_path) as store:
        store.db.execute("PRAGMA user_version = 999")
        store.db.conn.commit()
    code, _, err = run(capsys, "--db", str(db_path), "stats")
    assert code == 2 and "newer version" in err


def test_output_piped_into_head_is_not_a_traceback(cli_db):
    import subprocess
    import sys

    # More than a pipe holds (64 KiB), so the writer is still writing when head leaves.
    with Store(cli_db) as store:
        store.add_prompts([f"prompt {i} " + "x" * 100 for i in range(2000)])
    pipe = subprocess.run(f"{sys.executable} -m rlhf.cli --db {cli_db} prompts list | head -1", shell=True,
                          capture_output=True, text=True, timeout=120)
    assert pipe.stdout.startswith("1\tprompt 0") and "Traceback" not in pipe.stderr, pipe.stderr
