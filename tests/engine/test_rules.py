"""Rules as a known taste: parsing them, judging K completions, the scripted
labeler recording what the rule implies, and `rlhf label` on the command line."""

from __future__ import annotations

import pytest

from rlhf.errors import UserError
from rlhf.preferences import label_by_rule
from rlhf.rules import judge, pairwise_winrate, parse_rule


def test_built_in_rules_score_what_they_say():
    assert parse_rule("shorter")("one two three") == -3.0
    assert parse_rule("longer")("one two three") == 3.0
    contains = parse_rule("rule:contains=you")
    assert contains("Thank YOU.") == 1.0 and contains("youth and yours") == 0.0
    assert parse_rule(r"more=\d")("1, 22 and 3") == 4.0
    assert parse_rule(r"fewer=\bI\b")("I think I can.") == -2.0
    assert parse_rule("distinct")("", [5, 5, 6, 6]) == 0.5
    assert parse_rule("token=7")("", [7, 7, 3]) == 2.0
    assert parse_rule("ids-below=10", eos_id=2)("", [1, 2, 30, 4]) == 0.5
    short = parse_rule("short", budget=4)
    assert short("", [5, 2], True) == 0.5 and short("", [5, 5, 5, 5], False) == -1.0
    assert contains.labeler == "rule:contains=you"


@pytest.mark.parametrize("spec, message", [
    ("nonsense", "unknown rule 'nonsense': use one of shorter, longer"),
    ("more=", "needs a pattern"),
    ("more=(", "is not a regular expression"),
    ("token=x", "unknown rule"),
    ("no_such_module_xyz:score", "could not import no_such_module_xyz"),
])
def test_a_bad_rule_is_one_clear_line(spec, message):
    with pytest.raises(UserError, match=message) as caught:
        parse_rule(spec)
    assert "\n" not in str(caught.value)


def test_a_users_own_function_is_a_rule(tmp_path, monkeypatch):
    (tmp_path / "taste.py").write_text(
        "def polite(text):\n    return text.lower().count('please')\n\ndef broken(text):\n    return 'high'\n"
        "\ndef crashes(text):\n    return 1 / 0\n")
    monkeypatch.chdir(tmp_path)
    assert parse_rule("taste:polite")("Please, please.") == 2.0
    assert parse_rule(f"{tmp_path / 'taste.py'}:polite")("please") == 1.0
    with pytest.raises(UserError, match="has no function 'missing'"):
        parse_rule("taste:missing")
    with pytest.raises(UserError, match="must return a number"):
        parse_rule("taste:broken")("anything")
    with pytest.raises(UserError, match=r"'taste:crashes' failed on a completion \(ZeroDivisionError"):
        parse_rule("taste:crashes")("anything")


def test_judge_picks_the_top_every_one_that_shares_it_and_ties_only_all_equal():
    assert judge([0.0, 2.0, 1.0, 0.0]) == judge([0.0, 2.0, 1.0, 0.0], rank=True)  # rank needs all distinct
    assert judge([0.0, 2.0, 1.0, 0.0]).kind == "best" and judge([0.0, 2.0, 1.0, 0.0]).choice == [1]
    assert judge([1.0, 0.0, 1.0]).kind == "best" and judge([1.0, 0.0, 1.0]).choice == [0, 2]  # these two beat the rest
    assert judge([1.0, 1.0, 1.0]).kind == "tie" and judge([1.0, 1.0, 1.0]).choice is None
    assert judge([3.0, 1.0, 2.0], rank=True).kind == "ranking"
    assert judge([3.0, 1.0, 2.0], rank=True).choice == [0, 2, 1]


def test_pairwise_winrate_counts_ties_half():
    # 3 vs (1, 3): a win and a tie; 0 vs (1, 3): two losses -> (1 + 0.5) / 4
    assert pairwise_winrate([3.0, 0.0], [1.0, 3.0]) == pytest.approx(0.375)


# --- the scripted labeler on a store --------------------------------------------------------


def add_set(store, prompt: str, texts: list[str], version: int = 0) -> list[int]:
    pid = store.add_prompt(prompt)
    return store.add_completions(pid, [{"text": t, "token_ids": [1, 2], "n_tokens": 2, "finish_reason": "eos",
                                        "policy_version": version} for t in texts])


def test_scripted_labeler_records_the_comparisons_the_rule_implies(store):
    picked = add_set(store, "p1", ["no", "a banana here", "nothing", "none"])
    shared = add_set(store, "p2", ["banana", "banana too", "x", "y"])
    tied = add_set(store, "p3", ["a", "b", "c", "d"])
    second_round = add_set(store, "p1", ["z", "q", "w", "banana!"])   # the same prompt, sampled again
    rule = parse_rule("contains=banana")
    kinds = label_by_rule(store, rule, k=4)
    assert kinds == {"best": 3, "tie": 1}
    comparisons = store.comparisons(purpose="preference")
    assert [c.completion_ids for c in comparisons] == [picked, shared, tied, second_round]
    assert [c.kind for c in comparisons] == ["best", "best", "tie", "best"]
    assert [c.choice for c in comparisons] == [[1], [0, 1], None, [3]]
    assert {c.labeler for c in comparisons} == {"rule:contains=banana"}
    pairs = {(p["chosen_id"], p["rejected_id"]) for p in store.pairs(labeler="rule:contains=banana")}
    assert pairs == {(picked[1], other) for other in picked if other != picked[1]} | {
        (winner, loser) for winner in shared[:2] for loser in shared[2:]} | {
        (second_round[3], other) for other in second_round[:3]}
    assert store.pending_sets(4) == []
    assert label_by_rule(store, rule, k=4) == {}  # labeled sets are not labeled twice


def test_a_budget_of_decided_labels_counts_no_ties(store):
    sets = [add_set(store, f"p{i}", texts) for i, texts in enumerate(
        [["a", "b", "c", "d"], ["banana", "x", "y", "z"], ["e", "f", "g", "h"], ["x", "banana", "y", "z"],
         ["banana", "q", "r", "s"]])]
    kinds = label_by_rule(store, parse_rule("contains=banana"), k=4, decided=2)
    assert kinds == {"tie": 2, "best": 2}   # the ties met on the way are labeled, not counted
    assert [c.completion_ids for c in store.comparisons(purpose="preference")] == sets[:4]
    assert [[c.id for c in s] for _, s in store.pending_sets(4)] == [sets[4]]


def test_pending_sets_are_one_sampling_call_each(store):
    one = add_set(store, "p", ["a", "b", "c", "d", "e", "f", "g", "h"])   # two sets of 4 in a row
    other_version = add_set(store, "p", ["x", "y"], version=1)
    lone = add_set(store, "q", ["alone"])                                  # fewer than two: no comparison
    probe = store.add_prompt("a probe", source="probes")                   # the drift view's blind pairs
    blind = store.add_completions(probe, [{"text": t, "token_ids": [1], "n_tokens": 1, "finish_reason": "eos",
                                           "policy_version": 3} for t in ("r", "s")])
    sets = store.pending_sets(4)
    assert not set(blind) & {c.id for _, s in sets for c in s}
    assert [[c.id for c in s] for _, s in sets] == [one[:4], one[4:], other_version]
    assert lone[0] not in {c.id for _, s in sets for c in s}


def test_label_command_labels_and_says_what_it_did(capsys, cli_db):
    from rlhf.cli import main
    from rlhf.store import Store

    code = main(["--db", str(cli_db), "label", "--rule", "contains=banana"])
    err = capsys.readouterr().err
    assert code == 2 and "no comparisons waiting for a label" in err and err.count("\n") == 1
    with Store(cli_db) as store:
        add_set(store, "p1", ["banana", "no", "no", "no"])
        add_set(store, "p2", ["no", "no", "no", "no"])
    assert main(["--db", str(cli_db), "label", "--rule", "contains=banana"]) == 0
    out = capsys.readouterr().out
    assert "labeled 2 comparisons as rule:contains=banana (1 best, 1 tie); 3 pairs" in out
    with Store(cli_db) as store:
        add_set(store, "p3", ["no", "no", "no", "no"])
        add_set(store, "p4", ["no", "banana", "no", "no"])
        add_set(store, "p5", ["banana", "no", "no", "no"])
    assert main(["--db", str(cli_db), "label", "--rule", "contains=banana", "--decided", "1"]) == 0
    assert "labeled 2 comparisons as rule:contains=banana (1 best, 1 tie); 6 pairs" in capsys.readouterr().out
    assert main(["--db", str(cli_db), "label", "--rule", "contains=banana", "--decided", "2"]) == 0
    out, err = capsys.readouterr()
    assert "labeled 1 comparisons" in out and "only 1 of the 2 asked for have a preference" in err
    assert main(["--db", str(cli_db), "label", "--rule", "nonsense"]) == 2
    assert "unknown rule 'nonsense'" in capsys.readouterr().err
