"""What keeps the workbench answering keys while the model and a job share the
cores (benchmarks/app.py measures it): jobs and model work below the event
loop's priority, model work paused for a moment after each key, full garbage
collections in pauses, the prompt list toggled without restyling the screen."""

from __future__ import annotations

import gc
import os
import sys
import threading

import pytest

from conftest import FakeSampler, make_app, shown
from rlhf import jobs
from workbench import idle_gc
from workbench import model_host
from workbench.model_host import MODEL_THREAD_NICENESS, InputPause, _below_the_event_loop
from workbench.widgets.prompt_list import PromptList


def test_full_collections_wait_for_a_pause_in_the_input(monkeypatch):
    clock = [100.0]
    collected: list[int] = []
    monkeypatch.setattr(idle_gc.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(idle_gc.gc, "collect", lambda: collected.append(1))
    collector = idle_gc.IdleCollector()
    clock[0] += idle_gc.IDLE_S / 2
    assert not collector.maybe_collect()          # typing: not now
    clock[0] += idle_gc.IDLE_S
    collector.touched()                           # a key
    clock[0] += idle_gc.IDLE_S / 2
    assert not collector.maybe_collect() and collected == []
    clock[0] += idle_gc.IDLE_S
    assert collector.maybe_collect() and collected == [1]


def test_freezing_leaves_full_passes_to_the_app():
    saved = gc.get_threshold()
    try:
        idle_gc.freeze_long_lived()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold()[:2] == saved[:2] and gc.get_threshold()[2] == idle_gc.NO_AUTOMATIC_FULL_PASS
    finally:
        gc.unfreeze()
        gc.set_threshold(*saved)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="niceness per thread is Linux's")
def test_model_work_runs_below_the_event_loop_and_jobs_below_the_app():
    seen: list[int] = []
    worker = threading.Thread(target=_below_the_event_loop,
                              args=(lambda: seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id())),))
    worker.start()
    worker.join()
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert seen == [min(19, max(own, MODEL_THREAD_NICENESS))] and os.getpriority(os.PRIO_PROCESS, 0) == own
    assert jobs.JOB_NICENESS > MODEL_THREAD_NICENESS


def test_model_work_gives_way_to_a_key_at_its_next_token(monkeypatch):
    clock, slept = [100.0], []
    monkeypatch.setattr(model_host.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(model_host.time, "sleep", slept.append)
    pause = InputPause()
    assert not pause.should_stop() and slept == []       # no input: straight on
    pause.touched()
    clock[0] += model_host.INPUT_PAUSE_S / 3
    assert not pause.should_stop()
    assert slept == [pytest.approx(model_host.INPUT_PAUSE_S * 2 / 3)]


async def test_keys_are_noted_for_the_collector_and_the_model_and_l_toggles_only_the_list(store):
    app = make_app(store, FakeSampler(), idle_gc=True)
    async with app.run_test(size=(140, 40)) as pilot:
        screen = await shown(pilot, app)
        listed = screen.query_one(PromptList)
        before = app._idle_gc.last_input
        assert listed.display and app.model_host.input_pause._until == 0.0
        await pilot.press("l")
        assert app._idle_gc.last_input > before
        assert app.model_host.input_pause._until > 0.0
        assert not listed.display and not screen.has_class("-list-toggled")
        await pilot.press("l")
        assert listed.display
