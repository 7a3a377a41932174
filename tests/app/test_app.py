"""The labeling workbench driven through Textual's pilot.

A fake sampler (instant, or slow) stands in for the model in most tests, so each
runs in about a second; one test loads the tiny random model for real.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from conftest import PROMPTS, FakeSampler, label_screen, make_app, shown, wait_for

from rlhf.locking import AppLock
from rlhf.prompts import bundled_prompt_file, read_prompt_file
from rlhf.sampling import Sample, SamplingParams
from rlhf.store import Store
from workbench.__main__ import main
from workbench.app import WorkbenchApp
from workbench.screens.help import HelpScreen
from workbench.widgets.completion_card import CompletionCard


async def run_command(pilot, search: str) -> None:
    """Open the command palette, type ``search`` and run the first match."""
    await pilot.press("ctrl+p")
    await pilot.press(*search)
    await pilot.pause(0.3)
    await pilot.press("enter")


# --- start-up ------------------------------------------------------------------------


async def test_first_run_loads_sample_prompts(store):
    app = WorkbenchApp(store, k=4, sampler=FakeSampler(), rng=random.Random(0))
    expected = read_prompt_file(bundled_prompt_file()).prompts
    async with app.run_test() as pilot:
        screen = await shown(pilot, app)
        assert [p.text for p in store.prompts()] == expected
        assert len(expected) >= 50
        # The first prompt is on screen, and the list shows them all.
        assert str(screen.query_one("#prompt").render()) .strip().startswith(expected[0][:20])
        assert screen.query_one("#prompt-list").option_count == len(expected)


async def test_second_open_does_not_reload_samples(store):
    store.add_prompts(["mine"])
    app = WorkbenchApp(store, k=2, sampler=FakeSampler())
    async with app.run_test() as pilot:
        await shown(pilot, app)
    assert [p.text for p in store.prompts()] == ["mine"]


# --- labels ------------------------------------------------------------------------------


async def test_pick_records_what_was_shown_and_k_minus_1_pairs(store):
    app = make_app(store)
    async with app.run_test() as pilot:
        screen = await shown(pilot, app)
        shown_ids = [c.id for c in screen.shown]
        first_prompt = screen.shown_prompt_id
        await pilot.pause(0.1)
        await pilot.press("2")
        await wait_for(pilot, lambda: screen.shown_prompt_id not in (None, first_prompt))
    [cmp] = store.comparisons()
    assert cmp.prompt_id == first_prompt
    assert cmp.completion_ids == shown_ids     # exactly the order shown
    assert cmp.kind == "best" and cmp.choice == [1]
    assert cmp.labeler == "tester" and cmp.seconds >= 0.1
    pairs = store.pairs()
    assert len(pairs) == 3
    assert {p["chosen_id"] for p in pairs} == {shown_ids[1]}
    assert {p["rejected_id"] for p in pairs} == set(shown_ids) - {shown_ids[1]}


async def test_display_order_is_shuffled(store):
    app = make_app(store, k=6)
    orders = []
    async with app.run_test() as pilot:
        screen = await shown(pilot, app)
        for _ in range(3):
            await shown(pilot, app)
            orders.append([c.id for c in screen.shown])
            await pilot.press("s")
            await wait_for(pilot, lambda: [c.id for c in screen.shown] != orders[-1])
    # Sampling order is id order; at least one set was shown in another order.
    assert any(order != sorted(order) for order in orders)


async def test_ranking_records_all_pairs_in_order(store):
    app = make_app(store)
    async with app.run_test() as pilot:
        screen = await shown(pilot, app)
        ids = [c.id for c in screen.shown]
        await pilot.press("m", "3", "1")
        assert screen.ranking == [2, 0]
        assert not store.comparisons()          # nothing recorded half-way
        await pilot.press("1")                  # already ranked: ignored
        assert screen.ranking == [2, 0]
        await pilot.press("4")                  # K-1 ranked: the last is implied
        await wait_for(pilot, lambda: len(store.comparisons()) == 1)
    [cmp] = store.comparisons()
    assert cmp.kind == "ranking" and cmp.choice == [2, 0, 3, 1]
    order = [ids[i] for i in (2, 0, 3, 1)]
    got = {(p["chosen_id"], p["rejected_id"]) for p in store.pairs()}
    assert got == {(order[i], order[j]) for i in range(4) for j in range(i + 1, 4)}   # C(4,2) = 6


async def test_a_shared_top_records_each_marked_one_over_the_rest(store):
    app = make_app(store)
    async with app.run_test() as pilot:
        screen = await shown(pilot, app)
        ids = [c.id for c in screen.shown]
        await pilot.press("equals_sign", "1", "3", "4", "4")   # 4 marked, then unmarked
        assert screen.ranking == [0, 2] and screen.cards[2].rank == 1
        assert not store.comparisons()                     # nothing recorded half-way
        await pilot.press("equals_sign")
        await wait_for(pilot, lambda: len(store.comparisons()) == 1)
    [cmp] = store.comparisons()
    assert cmp.kind == "best" and cmp.choice == [0, 2]
    got = {(p["chosen_id"], p["rejected_id"]) for p in store.pairs()}
    assert got == {(ids[w], ids[r]) for w in (0, 2) for r in (1, 3)}


async def test_tie_all_bad_and_skip_keep_no_pairs(store):
    app = make_app(store)
    async with app.run_test() as pilot:
        screen = await shown(pilot, app)
        for key in ("t", "b", "s"):
            before = screen.shown_prompt_id
            await pilot.press(key)
            await wait_for(pilot, lambda before=before: screen.shown_prompt_id not in (None, before))
    assert [c.kind for c in store.comparisons()] == ["tie", "all_bad", "skip"]
    assert all(c.choice is None for c in store.comparisons())
    assert store.pairs() == []
    assert len(store.unlabeled_prompt_ids()) == 1


async def test_undo_removes_exactly_the_last_label(store):
    app = make_app(store)
    async with app.run_test() as pilot:
        screen = await shown(pilot, app)
        await pilot.press("1")
        await wait_for(pilot, lambda: len(store.comparisons()) == 1)
        second = await shown(pilot, app)
        second_prompt, second_order = second.shown_prompt_id, [c.id for c in second.shown]
        await pilot.press("m", "2", "1", "3")
        await wait_for(pilot, lambda: len(store.comparisons()) == 2)
        first_cmp, first_pairs = store.comparisons()[0], store.pairs(source="label")[:3]
        await pilot.press("u")
        await wait_for(pilot, lambda: screen.shown_prompt_id == second_prompt)
        # Back on the undone prompt, with the same completions in the same order.
        assert [c.id for c in screen.shown] == second_order
        assert store.last_comparison().id == first_cmp.id
    assert store.comparisons() == [first_cmp]
    assert store.pairs() == first_pairs
    assert second_prompt in store.unlabeled_prompt_ids()


async def test_resample_replaces_the_shown_completions(store):
    sampler = FakeSampler()
    app = make_app(store, sampler)
    async with app.run_test() as pilot:
        screen = await shown(pilot, app)
        pid, before = screen.shown_prompt_id, {c.id for c in screen.shown}
        await pilot.press("r")
        await wait_for(pilot, lambda: len(screen.shown) == 4 and {c.id for c in screen.shown} != before)
        after = {c.id for c in screen.shown}
        assert screen.shown_prompt_id == pid
        assert not after & before
        assert len(store.completions_for_prompt(pid)) == 8   # the old ones stay on record
        await pilot.press("1")
        await wait_for(pilot, lambda: len(store.comparisons()) == 1)
    assert set(store.comparisons()[0].completion_ids) == after


async def test_click_picks_a_completion(store):
    app = make_app(store)
    async with app.run_test(size=(160, 45)) as pilot:
        screen = await shown(pilot, app)
        third = screen.shown[2].id
        await pilot.click("#card-3")
        await wait_for(pilot, lambda: len(store.comparisons()) == 1)
    assert store.comparisons()[0].choice == [2]
    assert {p["chosen_id"] for p in store.pairs()} == {third}


async def test_command_palette_runs_actions(store):
    app = make_app(store)
    async with app.run_test() as pilot:
        await shown(pilot, app)
        await run_command(pilot, "all bad")
        await wait_for(pilot, lambda: len(store.comparisons()) == 1)
    assert store.comparisons()[0].kind == "all_bad"


async def test_command_palette_labels_waiting_comparisons_by_a_rule(store):
    from textual.widgets import Input

    from workbench.screens.dialogs import RuleDialog

    app = make_app(store)
    async with app.run_test() as pilot:
        await shown(pilot, app)
        await run_command(pilot, "label every waiting")
        await wait_for(pilot, lambda: isinstance(app.screen, RuleDialog))
        await pilot.press(*"nonsense", "enter")
        await wait_for(pilot, lambda: "unknown rule" in str(app.screen.query_one("#rule-error").render()))
        app.screen.query_one(Input).value = "more=1\\b"
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(store.comparisons()) >= 1)
        await wait_for(pilot, lambda: not isinstance(app.screen, RuleDialog))
    comparisons = store.comparisons()
    assert {c.labeler for c in comparisons} == {"rule:more=1\\b"}
    first = comparisons[0]  # the set with "answer 1 to ...": the only text the rule prefers
    texts = [c.text for c in store.completions(first.completion_ids)]
    assert first.kind == "best" and texts[first.choice[0]].startswith("answer 1 ")
    labeled = [i for c in comparisons for i in c.completion_ids]
    assert len(labeled) == len(set(labeled))  # each set labeled once


# --- sampling ---------------------------------------------------------------------------


async def test_ui_stays_responsive_while_a_slow_sampler_runs(store):
    sampler = FakeSampler()
    sampler.release.clear()            # the sampler blocks until released
    app = make_app(store, sampler)
    async with app.run_test() as pilot:
        try:
            screen = label_screen(app)
            await wait_for(pilot, lambda: len(sampler.calls) == 0 and screen._sampling)
            assert screen.query_one("#sample-activity").display   # progress is visible
            # Every key below takes effect while the sampler is still blocked.
            started = time.monotonic()
            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpScreen)
            await pilot.press("escape")
            assert app.screen is screen
            first = screen.deck.current_id
            await pilot.press("n")
            assert screen.deck.current_id != first
            assert "Second prompt?" in str(screen.query_one("#prompt").render())
            await pilot.press("1")                              # nothing shown yet: no label
            assert store.comparisons() == []
            assert sampler.calls == []
            assert time.monotonic() - started < 5               # generous: the CPU is shared
        finally:
            sampler.release.set()
        await shown(pilot, app)


async def test_prompts_skipped_past_are_not_sampled(store):
    store.add_prompts([f"Prompt {i}?" for i in range(1, 9)])
    sampler = FakeSampler()
    sampler.release.clear()            # prompt 1 holds the model...
    app = make_app(store, sampler)
    async with app.run_test() as pilot:
        screen = label_screen(app)
        await wait_for(pilot, lambda: 1 in screen._sampling)
        await pilot.press("n", "n", "n", "n")          # ...while the researcher moves on to prompt 5
        assert screen.deck.current_id == 5
        sampler.release.set()
        await wait_for(pilot, lambda: screen.shown_prompt_id == 5)
        await wait_for(pilot, lambda: len(sampler.calls) == 3)
        await pilot.pause(0.2)
    # Prompts 2-4 were passed by; 5 is shown and 6 sampled ahead (two workers: either may call first).
    assert sampler.calls[0] == "Prompt 1?" and sorted(sampler.calls[1:]) == ["Prompt 5?", "Prompt 6?"]


async def test_next_prompt_is_sampled_ahead(store):
    sampler = FakeSampler()
    app = make_app(store, sampler)
    async with app.run_test() as pilot:
        screen = await shown(pilot, app)
        await wait_for(pilot, lambda: len(sampler.calls) == 2)
        assert sampler.calls == PROMPTS[:2]
        await pilot.press("1")
        # The second prompt's completions were ready: shown without waiting.
        await pilot.pause(0.05)
        assert screen.shown and screen.shown_prompt_id == store.prompts()[1].id


async def test_reopening_reuses_unlabeled_completions(store):
    async with make_app(store).run_test() as pilot:
        await shown(pilot, pilot.app)
    sampler = FakeSampler()
    sampler.release.clear()            # a resample would block and the test would fail
    app = make_app(store, sampler)
    async with app.run_test() as pilot:
        screen = await shown(pilot, app)
        assert screen.shown_prompt_id == store.prompts()[0].id
        sampler.release.set()
    assert sampler.calls[:1] != ["First prompt?"]


async def test_length_cut_completions_are_marked(store):
    app = make_app(store, FakeSampler(cut_every=2))
    async with app.run_test() as pilot:
        screen = await shown(pilot, app)
        cards = list(screen.query(CompletionCard))
        cut = [card for card in cards if card.completion.finish_reason == "length"]
        assert cut and all(card.has_class("-cut") for card in cut)
        assert all("CUT" in str(card.border_subtitle) for card in cut)


async def test_narrow_terminal_stacks_the_completions(store):
    app = make_app(store)
    async with app.run_test(size=(80, 40)) as pilot:
        screen = await shown(pilot, app)
        assert screen.has_class("narrow")
        cards = list(screen.query(CompletionCard))
        assert len({card.region.x for card in cards}) == 1       # one column
    app = make_app(store)
    async with app.run_test(size=(160, 40)) as pilot:
        screen = await shown(pilot, app)
        assert not screen.has_class("narrow")
        cards = list(screen.query(CompletionCard))
        assert len({card.region.y for card in cards}) == 1       # one row


async def test_status_line_counts_labels_and_pairs(store):
    app = make_app(store)
    async with app.run_test() as pilot:
        screen = await shown(pilot, app)
        await pilot.press("1")
        await wait_for(pilot, lambda: len(store.comparisons()) == 1)
        text = str(screen.query_one("#status").render())
        assert "labeled 1/4" in text and "remaining 3" in text and "pairs 3" in text and "v0" in text
        screen.set_agreement("71% of 7")
        screen.show_scores([0.5, -1.0, 0.0, 2.0])
        await pilot.pause()
        assert "71% of 7" in str(screen.query_one("#status").render())
        assert "score +0.50" in str(screen.query_one("#card-1").border_title)


async def test_policy_version_picker_samples_from_the_chosen_version(store, tmp_path):
    store.add_prompts(PROMPTS)
    store.add_checkpoint("policy", tmp_path / "v1")
    app = make_app(store, policy_version=0)
    async with app.run_test() as pilot:
        screen = await shown(pilot, app)
        assert {c.policy_version for c in screen.shown} == {0}
        await pilot.press("v")
        await pilot.pause(0.1)
        await pilot.press("down", "enter")
        await wait_for(pilot, lambda: app.policy_version == 1)
        await wait_for(pilot, lambda: len(screen.shown) == 4 and {c.policy_version for c in screen.shown} == {1})
        assert "v1" in str(screen.query_one("#status").render())


async def test_add_and_edit_prompts(store):
    app = make_app(store)
    async with app.run_test() as pilot:
        screen = await shown(pilot, app)
        await pilot.press("a")
        await pilot.press(*"A brand new prompt")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: any(p.text == "A brand new prompt" for p in store.prompts()))
        new_id = store.prompts()[-1].id
        await wait_for(pilot, lambda: screen.shown_prompt_id == new_id)
        await pilot.press("e")
        await pilot.press("end", *" (edited)", "ctrl+s")
        await wait_for(pilot, lambda: store.prompt(new_id).text == "A brand new prompt (edited)")
        await wait_for(pilot, lambda: screen.shown_prompt_id == new_id
                       and all("(edited)" in c.text for c in screen.shown))


async def test_prompt_editor_refuses_a_prompt_over_the_size_limit(store):
    from textual.widgets import Label, TextArea

    from rlhf.text_input import MAX_TEXT_CHARS

    app = make_app(store)
    async with app.run_test() as pilot:
        await shown(pilot, app)
        before = len(store.prompts())
        await pilot.press("a")
        app.screen.query_one(TextArea).text = "x" * (MAX_TEXT_CHARS + 1)
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert f"the limit is {MAX_TEXT_CHARS}" in str(app.screen.query_one("#prompt-error", Label).render())
        assert len(store.prompts()) == before


async def test_editing_a_prompt_while_it_is_sampled_shows_answers_to_the_new_text(store):
    sampler = FakeSampler()
    sampler.release.clear()
    app = make_app(store, sampler)
    async with app.run_test() as pilot:
        screen = label_screen(app)
        await wait_for(pilot, lambda: bool(screen._sampling))
        await pilot.press("e", "end", *" Briefly.", "ctrl+s")
        await wait_for(pilot, lambda: store.prompt(1).text == "First prompt? Briefly.")
        sampler.release.set()
        await wait_for(pilot, lambda: len(screen.shown) == 4)
        assert all(c.text.endswith("to First prompt? Briefly.") for c in screen.shown)
        await pilot.press("1")
        await wait_for(pilot, lambda: len(store.comparisons()) == 1)
    shown_ids = store.comparisons()[0].completion_ids
    assert all("Briefly" in c.text for c in store.completions(shown_ids))


async def test_export_from_the_app(store, tmp_path):
    out = tmp_path / "prefs.jsonl"
    app = make_app(store)
    async with app.run_test() as pilot:
        await shown(pilot, app)
        await pilot.press("1")
        await wait_for(pilot, lambda: len(store.comparisons()) == 1)
        await pilot.press("x")
        await pilot.pause(0.1)
        path_input = app.screen.query_one("#export-path")
        path_input.value = str(out)
        path_input.focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: out.exists())
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and {"prompt", "chosen", "rejected"} <= set(rows[0])


# --- the real model ------------------------------------------------------------------


async def test_tiny_model_loads_in_a_worker_and_samples(store, tiny_dir):
    from rlhf.model_options import ModelOptions

    store.add_prompts(["Say hi.", "Count to three.", "Name a colour."])
    # The first prompt was sampled in an earlier session: it shows before the model is loaded.
    stored = [Sample(text=f"hi {i}", token_ids=[7, 2], logprobs=[-1.0, -1.0], finish_reason="eos")
              for i in range(2)]
    store.add_completions(1, [s.as_row(SamplingParams(), 0) for s in stored])

    app = WorkbenchApp(store, k=2, labeler="tester", sampling_params=SamplingParams(max_new_tokens=8),
                       model=ModelOptions(source=tiny_dir, quantize=False, device="cpu"))
    async with app.run_test() as pilot:
        screen = label_screen(app)
        await pilot.pause()
        assert app.model_state in ("loading", "ready")
        assert {c.text for c in screen.shown} == {"hi 0", "hi 1"}
        await pilot.press("1")
        await wait_for(pilot, lambda: len(store.comparisons()) == 1)
        await wait_for(pilot, lambda: app.model_state == "ready", timeout=60)
        # The second prompt is sampled by the model, and the third ahead of it.
        await wait_for(pilot, lambda: len(screen.shown) == 2 and screen.shown_prompt_id == 2, timeout=60)
        await wait_for(pilot, lambda: len(store.completions_for_prompt(3)) == 2, timeout=60)
        await pilot.press("2")
        await wait_for(pilot, lambda: len(store.comparisons()) == 2)
    completions = store.completions(store.comparisons()[1].completion_ids)
    assert all(c.policy_version == 0 and c.finish_reason in ("eos", "length") and c.logprobs for c in completions)
    assert len(store.pairs()) == 2


async def test_policy_versions_load_on_the_model_and_back_to_base(store, tiny_stack, tmp_path):
    import torch

    with torch.no_grad():
        for name, p in tiny_stack.peft.named_parameters():
            if ".policy." in name and "lora_B" in name:
                p.fill_(0.01)                     # a "trained" policy
    tiny_stack.save_adapter("policy", tmp_path / "policy-v1")
    store.add_checkpoint("policy", tmp_path / "policy-v1")
    tiny_stack.reset_policy()

    def lora_b_sum() -> float:
        return sum(p.abs().sum().item() for n, p in tiny_stack.peft.named_parameters()
                   if ".policy." in n and "lora_B" in n)

    assert lora_b_sum() == 0
    store.add_prompts(["Say hi.", "Count to three."])
    app = WorkbenchApp(store, k=2, labeler="tester", stack=tiny_stack, policy_version=0,
                       sampling_params=SamplingParams(max_new_tokens=4))
    async with app.run_test() as pilot:
        screen = label_screen(app)
        await wait_for(pilot, lambda: len(screen.shown) == 2, timeout=60)
        await pilot.press("v")
        await pilot.pause(0.1)
        await pilot.press("down", "enter")
        await wait_for(pilot, lambda: app.policy_version == 1, timeout=60)
        assert tiny_stack.policy_version == 1 and tiny_stack.reference_is_copy and lora_b_sum() > 0
        await wait_for(pilot, lambda: len(screen.shown) == 2 and {c.policy_version for c in screen.shown} == {1},
                       timeout=60)
        await pilot.press("v")
        await pilot.pause(0.1)
        await pilot.press("up", "enter")
        await wait_for(pilot, lambda: app.policy_version == 0, timeout=60)
        assert tiny_stack.policy_version == 0 and not tiny_stack.reference_is_copy and lora_b_sum() == 0


async def test_best_of_n_of_the_base_is_labeled_like_a_version(store, tiny_stack, tmp_path):
    """v offers best-of-4 and best-of-16 of the base once a reward model exists; chosen, each answer
    shown is the reward model's pick among 4 samples, stored as such, and labeled like any set."""
    tiny_stack.ensure_adapter("reward")
    tiny_stack.save_adapter("reward", tmp_path / "r1", {})
    store.add_checkpoint("reward", tmp_path / "r1", meta={"readout": {"layer": 1, "pool": "mean"}})
    store.add_prompts(["Say hi.", "Count to three."])
    app = WorkbenchApp(store, k=2, labeler="tester", stack=tiny_stack, policy_version=0,
                       sampling_params=SamplingParams(max_new_tokens=4))
    async with app.run_test() as pilot:
        screen = label_screen(app)
        await wait_for(pilot, lambda: len(screen.shown) == 2, timeout=60)
        await pilot.press("v")
        await pilot.pause(0.1)
        await pilot.press("down", "enter")   # v0, then best-of-4
        await wait_for(pilot, lambda: app.best_of == 4, timeout=60)
        await wait_for(pilot, lambda: len(screen.shown) == 2 and {c.best_of for c in screen.shown} == {4},
                       timeout=60)
        assert {(c.policy_version, c.reward_version) for c in screen.shown} == {(0, 1)}
        assert "best-of-4 of v0" in str(screen.query_one("#status").render())
        await pilot.press("1")
        await wait_for(pilot, lambda: len(store.comparisons()) == 1)
        shown = store.completions(store.comparisons()[0].completion_ids)
        assert {c.best_of for c in shown} == {4}
        await pilot.press("v")
        await pilot.pause(0.1)
        await pilot.press("up", "enter")     # back to the base's plain samples
        await wait_for(pilot, lambda: app.best_of is None, timeout=60)
        await wait_for(pilot, lambda: len(screen.shown) == 2 and {c.best_of for c in screen.shown} == {None},
                       timeout=60)


# --- the command line ------------------------------------------------------------------


def test_second_instance_is_refused(db_path, capsys):
    Store(db_path).close()
    with AppLock(db_path):
        with pytest.raises(Exception, match="another workbench"):
            AppLock(db_path).acquire()
        assert main(["--db", str(db_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another workbench" in err and "already has" in err
    with AppLock(db_path):      # released: can be taken again
        pass


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/model"], "does not exist"),
    (["--model", "/no/such/file.gguf"], "does not exist"),
])
def test_bad_model_is_one_line_before_the_screen(db_path, capsys, args, message):
    assert main(["--db", str(db_path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not db_path.exists()          # refused before anything was created


def test_k_out_of_range_is_refused(db_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--db", str(db_path), "--k", "9"])
    assert exit_info.value.code == 2
    assert "argument --k: must be from 2 to 6, got 9" in capsys.readouterr().err


def test_newer_database_is_refused(db_path, capsys):
    import sqlite3

    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA user_version = 999")
    conn.close()
    assert main(["--db", str(db_path)]) == 2
    err = capsys.readouterr().err
    assert "newer version" in err and err.count("\n") == 1


def test_lock_file_sits_beside_the_database(db_path):
    with AppLock(db_path) as lock:
        assert lock.path == Path(str(db_path) + ".lock")
        assert lock.held


async def test_a_failing_background_task_is_a_notice_and_the_app_stays_up(store, tmp_path, monkeypatch):
    import rlhf.exchange_export
    from workbench.screens.dialogs import ExportRequest

    app = make_app(store)
    notes: list[str] = []
    async with app.run_test() as pilot:
        await shown(pilot, app)
        real_notify = app.notify
        monkeypatch.setattr(app, "notify", lambda message, **kw: (notes.append(message), real_notify(message, **kw)))
        # A UserError in a screen's worker: the Train screen starts a job with no pairs to train on.
        await pilot.press("f2")
        await pilot.press("s")
        await wait_for(pilot, lambda: any("no preference pairs to train on" in n for n in notes))
        # A bug in the app's own worker: named on screen, the app keeps running.
        monkeypatch.setattr(rlhf.exchange_export, "export_pairs", lambda *a, **kw: 1 / 0)
        app.run_export(ExportRequest("trl", tmp_path / "x.jsonl", False))
        await wait_for(pilot, lambda: any("export failed: ZeroDivisionError" in n for n in notes))
        assert app.is_running and store.jobs() == []


async def test_import_from_the_app_completes_the_path_and_offers_the_prompts(store, tmp_path, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "preferences.jsonl").write_text(
        json.dumps({"prompt": "Imported prompt?", "chosen": "good", "rejected": "bad"}) + "\n")
    (folder / "notes.txt").write_text("not a preference file")
    app = make_app(store)
    notes: list[str] = []
    async with app.run_test() as pilot:
        screen = await shown(pilot, app)
        before = len(screen.deck.prompt_ids)
        real_notify = app.notify
        monkeypatch.setattr(app, "notify", lambda message, **kw: (notes.append(message), real_notify(message, **kw)))
        await pilot.press("i")
        await wait_for(pilot, lambda: app.screen.query("#import-path"))
        path_input = app.screen.query_one("#import-path")
        path_input.value = f"{folder}/"
        await wait_for(pilot, lambda: path_input._suggestion == f"{folder}/preferences.jsonl")  # before notes.txt
        await pilot.press("right")  # takes the suggestion
        assert path_input.value == f"{folder}/preferences.jsonl"
        app.screen.query_one("#import-label").value = True
        path_input.focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: any("imported 1 pairs from" in n for n in notes))
        assert "1 of its 1 prompts joined the labeling queue" in notes[-1]
        await wait_for(pilot, lambda: len(screen.deck.prompt_ids) == before + 1)
        await wait_for(pilot, lambda: f"/{before + 1}" in str(screen.query_one("#status").render()))
    assert len(store.pairs()) == 1 and store.prompts()[-1].text == "Imported prompt?"


async def test_the_import_dialog_names_a_path_that_is_not_there(store, tmp_path):
    app = make_app(store)
    async with app.run_test() as pilot:
        await shown(pilot, app)
        await pilot.press("i")
        await wait_for(pilot, lambda: app.screen.query("#import-path"))
        app.screen.query_one("#import-path").value = str(tmp_path / "missing.jsonl")
        await pilot.press("enter")
        await pilot.pause(0.1)
        assert "no file or folder" in str(app.screen.query_one("#import-error").render())
        await pilot.press("escape")
        await wait_for(pilot, lambda: not app.screen.query("#import-path"))
    assert store.pairs() == []


async def test_the_order_key_cycles_and_the_uncertain_order_takes_the_first_by_priority(store):
    from workbench.messages import PrioritiesMeasured
    from workbench.widgets.status_line import StatusLine

    app = make_app(store)
    async with app.run_test() as pilot:
        screen = await shown(pilot, app)
        first = screen.shown_prompt_id
        await pilot.press("o", "o")
        assert screen.deck.order == "random" and "order random" in str(screen.query_one(StatusLine).render())
        await pilot.press("o", "o")              # round to uncertain
        assert screen.deck.order == "uncertain"
        assert "order uncertain" in str(screen.query_one(StatusLine).render())
        others = [pid for pid in screen.deck.prompt_ids if pid != first]
        screen.post_message(PrioritiesMeasured({others[0]: 0.1, others[-1]: 0.9}))
        await wait_for(pilot, lambda: screen.deck.priority)
        asked: list[list[int]] = []
        app.model_host.measure_priorities = lambda requester, sets: asked.append([pid for pid, _ in sets])
        await pilot.press("1")
        await wait_for(pilot, lambda: screen.shown_prompt_id not in (None, first))
        assert screen.shown_prompt_id == others[-1] and not asked
        await pilot.press("1")
        await wait_for(pilot, lambda: screen.shown_prompt_id not in (None, others[-1]))
        assert screen.shown_prompt_id == others[0] and not asked
        await pilot.press("1")                   # the last ranked one labeled: the order measures again
        await wait_for(pilot, lambda: screen.shown_prompt_id not in (None, others[0]))
        assert len(asked) == 1 and others[0] not in asked[0]


async def test_the_uncertain_order_is_measured_on_the_model_before_any_reward_model(store, tiny_stack, monkeypatch):
    from rlhf.label_order import design_order, set_features
    from rlhf.reward_scoring import RewardScorer
    from workbench import model_host

    monkeypatch.setattr(model_host, "PRIORITY_CHUNK", 1)  # read a set at a time: the features still line up
    sampler = FakeSampler()
    store.add_prompts(PROMPTS)
    for prompt in store.prompts():                 # every prompt's set sampled: all wait for a label
        samples = sampler([prompt.text], 4)[0]
        store.add_completions(prompt.id, [{"text": s.text, "token_ids": s.token_ids, "n_tokens": len(s.token_ids),
                                           "finish_reason": "eos", "policy_version": 0} for s in samples])
    app = make_app(store, sampler=sampler, stack=tiny_stack, policy_version=0)
    async with app.run_test() as pilot:
        screen = await shown(pilot, app)
        first = screen.shown_prompt_id
        await pilot.press("o")                     # to uncertain: no reward version, the design reads the base
        assert screen.deck.order == "uncertain"
        await wait_for(pilot, lambda: screen.deck.priority, timeout=30)
        waiting = screen.deck.waiting_sets()
        assert set(screen.deck.priority) == {pid for pid, _ in waiting}
        await pilot.press("1")
        await wait_for(pilot, lambda: screen.shown_prompt_id not in (None, first))
    features = set_features(RewardScorer(tiny_stack), [(store.prompt(pid).text, shown) for pid, shown in waiting])
    by_design = [waiting[i][0] for i in design_order([], features)]
    assert screen.shown_prompt_id == next(pid for pid in by_design if pid != first)


async def test_an_earlier_comparison_comes_back_unannounced_and_trains_nothing(store):
    from rlhf.consistency import self_agreement
    from workbench.widgets.status_line import StatusLine

    app = make_app(store, repeat_every=2)
    async with app.run_test() as pilot:
        screen = await shown(pilot, app)
        for _ in range(2):
            before = screen.shown_prompt_id
            await pilot.press("1")
            await wait_for(pilot, lambda before=before: screen.shown_prompt_id not in (None, before))
        earlier = {frozenset(c.completion_ids): c for c in store.comparisons(purpose="preference")}
        assert screen.repeat_of is not None                      # the third set shown is one already labeled
        again = frozenset(c.id for c in screen.shown)
        assert again in earlier
        assert screen.query_one("#prompt").border_subtitle == ""  # not announced
        pairs = len(store.pairs())
        original = earlier[again]
        # Answer it the other way round: pick one the earlier label did not.
        other = next(i for i, c in enumerate(screen.shown) if c.id != original.completion_ids[original.choice[0]])
        await pilot.press(str(other + 1))
        await wait_for(pilot, lambda: store.comparisons(purpose="repeat"))
        assert screen.repeat_of is None
        assert len(store.pairs()) == pairs                       # a repeat trains nothing
        assert len(store.comparisons(purpose="preference")) == 2
        mine = self_agreement(store, "tester")
        assert (mine.repeats, mine.pairs, mine.agreed) == (1, 3, 0)  # the old pick over each other: none kept
        assert "you agree with you 0% of 1" in str(screen.query_one(StatusLine).render())
