"""Following a background job's rows from a screen (the Train and PPO screens).

Polls read the store in a worker and can overlap when a read is slow, so new
metric rows are merged by step: only points past the last one drawn are kept.
"""

from __future__ import annotations

from rlhf.rows import Job

Series = dict[str, list[tuple[int, float]]]


def merge_new_points(series: Series, new_metrics: Series, last_step: int) -> int | None:
    """Append the points after ``last_step`` to ``series``; returns the new last
    step, or None when nothing was new."""
    fresh = {name: [(s, v) for s, v in points if s > last_step] for name, points in new_metrics.items()}
    fresh = {name: points for name, points in fresh.items() if points}
    if not fresh:
        return None
    for name, points in fresh.items():
        series.setdefault(name, []).extend(points)
    return max(step for points in fresh.values() for step, _ in points)


def just_finished(before: Job | None, now: Job | None) -> bool:
    """Did this job end between two polls (active before, not now)?"""
    return (before is not None and now is not None and before.id == now.id
            and before.active and not now.active)
