"""The serving benchmark's paired ratios and the verdicts the closing notes quote from them."""

from __future__ import annotations

import pytest

from benchmarks.serve_bench import add_paired_statistics, judge_interval, paired_ratio


def test_paired_ratio_is_the_median_of_each_rounds_ratio_with_an_interval_around_it() -> None:
    base = [100.0, 80.0, 120.0, 90.0, 110.0]
    grafted = [95.0, 78.0, 111.0, 88.0, 100.0]  # ratios 0.95, 0.975, 0.925, 0.978, 0.909
    median, low, high = paired_ratio(grafted, base)
    assert median == pytest.approx(0.95)
    assert 0.909 - 1e-9 <= low <= median <= high <= 0.978 + 1e-9
    # a drift shared by both runs of a round cancels: the ratio of medians would not be 0.95 here
    assert paired_ratio([95.0, 190.0, 9.5], [100.0, 200.0, 10.0]) == pytest.approx((0.95, 0.95, 0.95))


def test_a_target_is_met_or_missed_only_when_the_whole_interval_says_so() -> None:
    assert judge_interval((0.99, 0.985, 1.01), 0.98) == "met"
    assert judge_interval((0.96, 0.95, 0.97), 0.98) == "not met"
    assert judge_interval((0.99, 0.93, 1.05), 0.98) == "within the noise"


def test_stored_results_are_reanalysed_from_their_rounds() -> None:
    rounds = {
        "base": [[100.0, 1.0], [100.0, 1.0], [100.0, 1.0]],
        "swap": [[99.0, 1.0], [99.5, 1.0], [99.2, 1.0]],
        "mixed": [[90.0, 1.0], [91.0, 1.0], [89.0, 1.0]],
        "auto": [[99.0, 1.0], [99.5, 1.0], [99.2, 1.0]],
    }
    result = {
        "throughput": [
            {"tasks": 1, "hot_share": None, "runs_wall_cpu": rounds},
            {"tasks": 100, "hot_share": None, "runs_wall_cpu": {**rounds, "auto": rounds["mixed"]}},
            {"tasks": 100, "hot_share": 0.8, "runs_wall_cpu": rounds},
        ]
    }
    add_paired_statistics(result)
    assert result["throughput"][0]["auto_paired"][0] == pytest.approx(0.992)
    assert result["targets_paired_interval"] == {
        "auto at 1 tasks >= 0.98": "met",
        "auto at 100 tasks >= 0.95": "not met",
    }
