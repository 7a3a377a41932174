"""The numbers reports rest on: an interval that reads small counts honestly."""

from __future__ import annotations

import pytest

from rlhf.stats import correlation, rate_text, wilson_interval


def test_wilson_interval_for_small_counts():
    low, high = wilson_interval(7, 12)
    assert (round(low, 2), round(high, 2)) == (0.32, 0.81)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0


def test_pairs_from_one_comparison_do_not_narrow_the_interval():
    # 36 pairs from 12 best-of-4 comparisons carry the information of about 12 draws.
    assert rate_text(7 / 12, 36, independent=12) == "0.58 on 36 pairs from 12 comparisons (95% CI 0.32-0.81)"
    assert rate_text(7 / 12, 36).endswith("(95% CI 0.42-0.73)")
    assert rate_text(None, 0) == "- on 0 pairs"


def test_correlation_is_undefined_rather_than_invented():
    assert correlation([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert correlation([1, 1, 1], [1, 2, 3]) is None
    assert correlation([1, 2], [1, 2]) is None
