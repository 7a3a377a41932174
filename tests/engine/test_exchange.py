"""Export to TRL / Parquet / datasets and import back, HH-RLHF transcripts, bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.chat import prompt_messages
from rlhf.cli import main
from rlhf.errors import UserError
from rlhf.exchange_export import METADATA_COLUMNS, export_pairs
from rlhf.exchange_import import PreferencePair, import_file, parse_row, read_preference_file
from rlhf.preferences import record_label
from rlhf.store import Store

HH_SAMPLE = Path(__file__).parents[3] / "shared" / "data" / "hh-harmless-sample.jsonl"
needs_hh = pytest.mark.skipif(not HH_SAMPLE.exists(),
                              reason=f"{HH_SAMPLE} is absent (the shared data folder beside the repo)")
MULTI_TURN = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke.\n\nAssistant:"


def label(store: Store, text: str, kind: str, choice: list[int] | None, *, k: int = 3,
          labeler: str = "ann", version: int = 0) -> list[int]:
    prompt_id = store.add_prompt(text)
    ids = store.add_completions(prompt_id, [
        {"text": f"reply {i} to {text!r} ✓\nsecond line", "n_tokens": 4, "finish_reason": "eos",
         "policy_version": version} for i in range(k)])
    record_label(store, prompt_id, ids, kind, choice, labeler=labeler)
    return ids


@pytest.fixture
def labeled(store: Store, tmp_path) -> Store:
    """Labels of two labelers and two policy versions, plus one imported multi-turn pair."""
    label(store, "Write a haiku about rain.", "best", [1])                       # 2 pairs
    label(store, "Explain recursion in one line.", "ranking", [2, 0, 1])         # 3 pairs
    label(store, "Say nothing.", "tie", None)                                     # none
    label(store, "Name a prime.", "best", [0], labeler="bob", version=1)         # 2 pairs
    hh = tmp_path / "hh.jsonl"
    hh.write_text(json.dumps({"chosen": MULTI_TURN + " Why did the chicken cross the road?",
                              "rejected": MULTI_TURN + " No."}) + "\n")
    assert import_file(store, hh).added == 1
    return store


def triples(store: Store) -> set[tuple[str, str, str]]:
    return {(p["prompt"], p["chosen"], p["rejected"]) for p in store.pairs()}


# --- round trips ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, name, conversational", [
    ("trl", "pairs.jsonl", False),
    ("trl", "pairs.jsonl", True),
    ("parquet", "pairs.parquet", False),
    ("parquet", "pairs.parquet", True),
    ("hf", "pairs_dataset", False),
    ("hf", "pairs_dataset", True),
])
def test_export_then_import_gives_the_same_pairs(labeled, tmp_path, fmt, name, conversational):
    out = tmp_path / name
    n = export_pairs(labeled, out, fmt, conversational=conversational)
    assert n == 8

    with Store(tmp_path / "other.db") as other:
        report = import_file(other, out)
        assert (report.added, report.duplicates, report.errors) == (8, 0, [])
        assert triples(other) == triples(labeled)
        assert {p["source"] for p in other.pairs()} == {f"import:{name}"}


def test_trl_export_loads_with_datasets_and_has_trl_columns(labeled, tmp_path):
    import datasets

    out = tmp_path / "pairs.jsonl"
    export_pairs(labeled, out, "trl")
    ds = datasets.load_dataset("json", data_files=str(out), split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.num_rows == 8
    assert {"prompt", "chosen", "rejected"} <= set(ds.column_names)
    assert set(ds.column_names) == {"prompt", "chosen", "rejected", *METADATA_COLUMNS}
    assert all(isinstance(ds[0][k], str) for k in ("prompt", "chosen", "rejected"))


def test_conversational_export_is_trl_message_lists(labeled, tmp_path):
    import datasets

    out = tmp_path / "pairs.jsonl"
    export_pairs(labeled, out, "trl", conversational=True, metadata=False)
    ds = datasets.load_dataset("json", data_files=str(out), split="train", cache_dir=str(tmp_path / "cache"))
    assert set(ds.column_names) == {"prompt", "chosen", "rejected"}
    first = ds[0]
    assert first["prompt"] == [{"role": "user", "content": "Write a haiku about rain."}]
    assert [m["role"] for m in first["chosen"]] == ["assistant"]
    assert [m["role"] for m in first["rejected"]] == ["assistant"]
    # The imported HH transcript becomes its turns, not one user message holding a transcript.
    multi = next(r for r in ds if len(r["prompt"]) > 1)
    assert multi["prompt"] == [{"role": "user", "content": "Hi there"},
                               {"role": "assistant", "content": "Hello! How can I help?"},
                               {"role": "user", "content": "Tell me a joke."}]


def test_metadata_columns_carry_the_label(labeled, tmp_path):
    out = tmp_path / "pairs.jsonl"
    export_pairs(labeled, out, "trl", source="label")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    comparisons = {c.id: c for c in labeled.comparisons()}
    for row in rows:
        comparison = comparisons[row["comparison_id"]]
        assert row["labeler"] == comparison.labeler
        assert row["source"] == "label"
        assert row["created_at"] >= comparison.created_at[:10]
    assert {row["policy_version"] for row in rows} == {0, 1}


def test_export_filters(labeled, tmp_path):
    out = tmp_path / "pairs.jsonl"
    assert export_pairs(labeled, out, "trl", labeler="bob") == 2
    assert export_pairs(labeled, out, "trl", policy_version=0) == 5
    assert export_pairs(labeled, out, "trl", source="label") == 7
    assert export_pairs(labeled, out, "trl", source="import") == 1
    assert export_pairs(labeled, out, "trl", source="import:hh.jsonl") == 1
    assert export_pairs(labeled, out, "trl", since="2000-01-01") == 8
    with pytest.raises(UserError, match="label some first or loosen the filters"):
        export_pairs(labeled, out, "trl", since="2999-01-01")
    with pytest.raises(UserError, match="not a date"):
        export_pairs(labeled, out, "trl", since="last tuesday")


def test_export_of_an_empty_store_says_what_to_do(store, tmp_path):
    with pytest.raises(UserError, match="no pairs match .*label some first or loosen the filters"):
        export_pairs(store, tmp_path / "pairs.jsonl", "trl")
    assert not (tmp_path / "pairs.jsonl").exists()


def test_hf_export_overwrites_its_own_folder_but_no_other(labeled, tmp_path):
    out = tmp_path / "ds"
    export_pairs(labeled, out, "hf")
    assert export_pairs(labeled, out, "hf", labeler="bob") == 2
    assert len(read_preference_file(out)[0]) == 2
    other = tmp_path / "papers"
    other.mkdir()
    (other / "thesis.txt").write_text("precious")
    with pytest.raises(UserError, match="not a saved dataset"):
        export_pairs(labeled, other, "hf")
    assert (other / "thesis.txt").read_text() == "precious"


# --- HH-RLHF ----------------------------------------------------------------------------


@needs_hh
def test_hh_sample_imports_every_distinct_pair_with_the_prompt_up_to_the_last_assistant_turn(store):
    lines = [json.loads(line) for line in HH_SAMPLE.read_text().splitlines() if line.strip()]
    distinct = {(row["chosen"], row["rejected"]) for row in lines}

    report = import_file(store, HH_SAMPLE)

    assert report.errors == []
    assert report.added == len(distinct) == store.stats()["pairs_imported"]
    pairs = store.pairs(source="import")
    assert all(p["prompt"].startswith("\n\nHuman:") and p["prompt"].endswith("\n\nAssistant:") for p in pairs)
    # A well-formed row: the prompt is the chosen dialogue up to its last "\n\nAssistant:".
    first = lines[0]["chosen"]
    cut = first.rfind("\n\nAssistant:") + len("\n\nAssistant:")
    assert (pairs[0]["prompt"], pairs[0]["chosen"]) == (first[:cut], first[cut:].strip())
    assert pairs[0]["rejected"] == lines[0]["rejected"][cut:].strip()


@needs_hh
def test_importing_the_same_file_twice_adds_nothing(store):
    first = import_file(store, HH_SAMPLE)
    second = import_file(store, HH_SAMPLE)
    assert second.added == 0 and second.duplicates == first.added
    assert store.stats()["pairs_imported"] == first.added


def test_hh_pair_whose_dialogues_differ_before_the_last_turn_shares_the_common_prompt():
    # As in one row of the HH sample: the chosen dialogue goes on after a broken turn marker.
    base = "\n\nHuman: Are drag queens men?\n\nAssistant:"
    pair, error = parse_row({"chosen": base + " No.  Human: Really?\n\nAssistant: Yes.",
                             "rejected": base + " Sometimes."})
    assert error is None
    assert pair == PreferencePair(base, "No.  Human: Really?\n\nAssistant: Yes.", "Sometimes.")


def test_imported_prompts_stay_out_of_the_labeling_queue(labeled):
    queue = {p.text for p in labeled.prompts()}
    assert MULTI_TURN not in queue and "Write a haiku about rain." in queue
    assert MULTI_TURN in {p.text for p in labeled.prompts(include_imported=True)}
    assert all(labeled.prompt(i).text != MULTI_TURN for i in labeled.unlabeled_prompt_ids())
    assert MULTI_TURN in {labeled.prompt(i).text for i in labeled.unlabeled_prompt_ids(include_imported=True)}


# --- row formats and bad rows --------------------------------------------------------------


@pytest.mark.parametrize("row, expected", [
    # TRL's documented examples (Dataset formats and types: preference).
    ({"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
     PreferencePair("The sky is", " blue.", " green.")),
    ({"chosen": "The sky is blue.", "rejected": "The sky is green."},
     PreferencePair("The sky is", " blue.", " green.")),
    ({"prompt": [{"role": "user", "content": "What color is the sky?"}],
      "chosen": [{"role": "assistant", "content": "It is blue."}],
      "rejected": [{"role": "assistant", "content": "It is green."}]},
     PreferencePair("What color is the sky?", "It is blue.", "It is green.")),
    ({"chosen": [{"role": "user", "content": "What color is the sky?"},
                 {"role": "assistant", "content": "It is blue."}],
      "rejected": [{"role": "user", "content": "What color is the sky?"},
                   {"role": "assistant", "content": "It is green."}]},
     PreferencePair("What color is the sky?", "It is blue.", "It is green.")),
    # A multi-turn conversational prompt is kept as an HH transcript.
    ({"prompt": [{"role": "user", "content": "Hi there"},
                 {"role": "assistant", "content": "Hello! How can I help?"},
                 {"role": "user", "content": "Tell me a joke."}],
      "chosen": [{"role": "assistant", "content": "A joke."}],
      "rejected": [{"role": "assistant", "content": "No."}]},
     PreferencePair(MULTI_TURN, "A joke.", "No.")),
])
def test_each_trl_preference_format_is_read(row, expected):
    assert parse_row(row) == (expected, None)


def test_prompt_messages_inverts_the_transcript_exactly():
    assert prompt_messages("Plain question?") == [{"role": "user", "content": "Plain question?"}]
    assert len(prompt_messages(MULTI_TURN)) == 3
    odd = "\n\nHuman:no space\n\nAssistant:"  # not written back the same way: kept whole
    assert prompt_messages(odd) == [{"role": "user", "content": odd}]


def test_bad_lines_are_reported_with_their_numbers_and_good_ones_kept(store, tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([
        json.dumps({"prompt": "p1", "chosen": "good", "rejected": "bad"}),        # 1 ok
        '{"prompt": "p2", "chosen": "x",',                                        # 2 broken JSON
        json.dumps({"prompt": "p3", "chosen": "only chosen"}),                    # 3 no rejected
        "",                                                                       # 4 blank: ignored
        json.dumps({"prompt": "p5", "chosen": "same", "rejected": "same"}),       # 5 no preference
        json.dumps({"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                    "chosen": [{"role": "assistant", "content": "a"}],
                    "rejected": [{"role": "assistant", "content": "b"}]}),        # 6 system message
        json.dumps({"prompt": "p7", "chosen": ["not", "messages"], "rejected": "r"}),  # 7 mixed
        json.dumps(["a", "list"]),                                                # 8 not an object
        json.dumps({"prompt": "p9", "chosen": "fine", "rejected": "worse"}),      # 9 ok
    ]) + "\n")

    report = import_file(store, path)

    assert report.added == 2
    assert [e.split(":")[:2] for e in report.errors] == [
        ["mixed.jsonl", "2"], ["mixed.jsonl", "3"], ["mixed.jsonl", "5"], ["mixed.jsonl", "6"],
        ["mixed.jsonl", "7"], ["mixed.jsonl", "8"]]
    assert "not valid JSON" in report.errors[0] and "'rejected'" in report.errors[1]
    assert triples(store) == {("p1", "good", "bad"), ("p9", "fine", "worse")}


def test_read_preference_file_leaves_the_store_alone(store, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n")
    pairs, errors = read_preference_file(path)
    assert pairs == [PreferencePair("p", "c", "r")] and errors == []
    assert store.pairs() == []


def test_missing_or_unreadable_files_are_one_clear_error(store, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        import_file(store, tmp_path / "nope.jsonl")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xc3\x28bad")
    with pytest.raises(UserError, match="not UTF-8"):
        import_file(store, binary)
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UserError, match="UTF-16 text: save it as UTF-8"):
        import_file(store, binary)
    binary.write_bytes(b'{"prompt": "p", "chosen": "c\x00", "rejected": "r"}\n')
    with pytest.raises(UserError, match="binary file"):
        import_file(store, binary)
    fake = tmp_path / "fake.parquet"
    fake.write_text("not parquet")
    with pytest.raises(UserError, match="as Parquet"):
        import_file(store, fake)
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(UserError, match="not a dataset saved with save_to_disk"):
        import_file(store, folder)


# --- the command line ------------------------------------------------------------------------


def test_cli_import_prints_a_summary_and_each_bad_line(capsys, cli_db, tmp_path):
    path = tmp_path / "few.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\nnot json\n")
    assert main(["--db", str(cli_db), "import", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == ("imported 1 pairs from " + str(path) +
                           " as import:few.jsonl (0 already there, 1 bad rows skipped)")
    assert err.strip().startswith("skipped few.jsonl:2: not valid JSON")


def test_cli_import_of_a_missing_file_is_one_line_and_exit_2(capsys, cli_db, tmp_path):
    assert main(["--db", str(cli_db), "import", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlhf: error: ") and "missing.jsonl does not exist" in err and "\n" not in err


def test_cli_export_and_its_errors(capsys, db_path, tmp_path):
    with Store(db_path) as store:
        label(store, "Q?", "best", [0])
    out = tmp_path / "pairs.parquet"
    assert main(["--db", str(db_path), "export", str(out), "--no-metadata"]) == 0  # format from the suffix
    assert capsys.readouterr().out.strip() == f"wrote 2 pairs to {out} (parquet, standard)"
    assert len(read_preference_file(out)[0]) == 2

    assert main(["--db", str(db_path), "export", str(tmp_path / "pairs.txt")]) == 2
    assert "pass --format" in capsys.readouterr().err
    assert main(["--db", str(db_path), "export", str(tmp_path / "p.jsonl"), "--labeler", "nobody"]) == 2
    assert "label some first or loosen the filters" in capsys.readouterr().err
    assert main(["--db", str(db_path), "export", str(tmp_path / "no" / "p.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_import_can_put_the_files_prompts_in_the_labeling_queue(capsys, cli_db, tmp_path):
    from rlhf.store import Store

    rows = [{"prompt": "Own prompt?", "chosen": "a", "rejected": "b"},
            {"prompt": "New prompt?", "chosen": "c", "rejected": "d"},
            {"prompt": "New prompt?", "chosen": "e", "rejected": "f"}]
    path = tmp_path / "offer.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with Store(cli_db) as store:
        store.add_prompt("Own prompt?")
    db = ["--db", str(cli_db)]
    assert main([*db, "import", str(path)]) == 0
    with Store(cli_db) as store:  # imported prompts stay out of the queue unless asked
        assert [p.text for p in store.prompts()] == ["Own prompt?"]
    capsys.readouterr()
    assert main([*db, "import", str(path), "--label-prompts"]) == 0
    out = capsys.readouterr().out
    assert "(3 already there, 0 bad rows skipped)" in out
    assert "1 of its 2 prompts joined the labeling queue" in out  # the own prompt was already there
    with Store(cli_db) as store:
        assert [p.text for p in store.prompts()] == ["Own prompt?", "New prompt?"]
        new = next(p for p in store.prompts() if p.text == "New prompt?")
        assert new.id in store.unlabeled_prompt_ids()
        assert len(store.pairs()) == 3  # the imported pairs are kept as they were
