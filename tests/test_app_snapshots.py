"""Whole-screen pictures of the labeling screen (pytest-textual-snapshot).

Update after a deliberate change with ``pytest tests/test_app_snapshots.py --snapshot-update``
and look at the pictures in ``snapshot_report.html`` before committing them.
"""

from __future__ import annotations

import random

from conftest import PROMPTS, FakeSampler, shown

from workbench.app import WorkbenchApp


def _app(store) -> WorkbenchApp:
    store.add_prompts(PROMPTS)
    app = WorkbenchApp(store, k=4, labeler="tester", sampler=FakeSampler(cut_every=3), rng=random.Random(0))
    app.sub_title = "workbench.db"  # the real one is a fresh temporary path each run
    return app


def test_label_screen_wide_with_a_ranking_under_way(store, snap_compare):
    async def run_before(pilot) -> None:
        await shown(pilot, pilot.app)
        await pilot.press("m", "3")
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()

    assert snap_compare(_app(store), terminal_size=(140, 34), run_before=run_before)


def test_label_screen_narrow_stacks_completions(store, snap_compare):
    async def run_before(pilot) -> None:
        await shown(pilot, pilot.app)
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()

    assert snap_compare(_app(store), terminal_size=(80, 34), run_before=run_before)
