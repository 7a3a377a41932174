"""The labeling screen's status line: each fact whole, on as many lines as the width needs."""

from __future__ import annotations

from conftest import make_app, shown
from rich.console import Console
from rich.text import Text

from workbench.widgets.status_line import ItemLine, StatusLine


def test_a_line_breaks_between_items_never_inside_one():
    items = [Text(t) for t in ("labeled 3/20", "pairs 9", "RM agrees 71% of 120 labels (v3)", "mode pick best")]
    console = Console(width=40, record=True)
    console.print(ItemLine(items))
    lines = console.export_text().splitlines()
    assert lines == ["labeled 3/20  │  pairs 9", "RM agrees 71% of 120 labels (v3)", "mode pick best"]
    assert len(ItemLine(items).lines(200)) == 1


async def test_the_status_line_grows_to_show_every_fact_whole(store):
    app = make_app(store)
    async with app.run_test(size=(72, 30)) as pilot:
        screen = await shown(pilot, app)
        status = screen.query_one(StatusLine)
        # Through the app and the keys, as a user sets them: a fact set on the line
        # alone is redrawn from the screen's state when the next set is sampled.
        app.agreement = "71% of 120 labels (v3)"
        await pilot.press("o")                          # the order: uncertain
        await pilot.pause()
        lines = status.render().lines(status.content_size.width)
        assert len(lines) > 1 and status.content_size.height == len(lines)
        for fact in ("RM agrees 71% of 120 labels (v3)", "order uncertain", "mode pick best"):
            assert any(fact in line.plain for line in lines), fact
