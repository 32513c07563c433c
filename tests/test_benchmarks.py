"""The benchmark harness's statistics and interleaving (issue 27): what the README's ratios rest on. Structure and
arithmetic only -- no timed assertions."""

import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import harness  # noqa: E402


def test_bootstrap_interval_holds_the_median_and_narrows_with_more_pairs():
    values = [1.0 + 0.01 * ((7 * i) % 11 - 5) for i in range(40)]  # spread +-5% around 1.0
    lo, hi = harness.bootstrap_ci(values)
    assert lo <= sorted(values)[20] <= hi and lo < 1.0 < hi
    lo10, hi10 = harness.bootstrap_ci(values[:10])
    assert hi10 - lo10 > hi - lo
    assert harness.bootstrap_ci([1.5]) == (1.5, 1.5)
    assert harness.bootstrap_ci(values) == harness.bootstrap_ci(values)  # seeded: a rerun prints the same interval


def test_compare_pairs_alternate_and_stop_once_the_interval_is_narrow():
    calls = []

    def contender(name, cost):
        return lambda: calls.append(name) or cost

    result = harness.compare({"a": contender("a", 2.0), "b": contender("b", 3.0)}, "a", min_pairs=4,
                             echo=lambda m: None)
    assert result["pairs"] == 4 and result["converged"]  # identical costs: a zero-width interval at once
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]  # the order alternates from pair to pair
    assert result["ratios"]["b"]["median"] == pytest.approx(1.5) and result["ratios"]["b"]["ci"] == [1.5, 1.5]
    assert result["costs"] == {"a": 2.0, "b": 3.0}


def test_compare_gives_up_at_the_budget_when_noise_keeps_the_interval_wide():
    costs = iter([1.0, 1.0, 1.0, 2.0] * 50)
    result = harness.compare({"a": lambda: next(costs), "b": lambda: next(costs)}, "a", budget_s=0.0, min_pairs=2,
                             echo=lambda m: None)
    assert result["pairs"] == 3 and not result["converged"]  # at least 3 pairs whatever the budget
    assert result["ratios"]["b"]["half_width"] > 0.02


def test_interleave_runs_one_step_of_each_loop_in_turn():
    log, threads = [], set()

    def loop(name, steps):
        def run(tick):
            threads.add(threading.current_thread().name)
            for i in range(steps):
                tick()
                log.append((name, i))
        return run

    costs = harness.interleave({"a": loop("a", 6), "b": loop("b", 6)}, "b", warmup=2)
    assert log[:6] == [("b", 0), ("a", 0), ("b", 1), ("a", 1), ("b", 2), ("a", 2)]
    assert len(log) == 12 and len(threads) == 2
    assert [len(c) for c in costs.values()] == [3, 3]  # 6 steps: 5 intervals, 2 of warm-up dropped
    assert all(c >= 0 for cs in costs.values() for c in cs)


def test_interleave_reports_a_failing_contender_and_lets_the_other_finish():
    done = []

    def good(tick):
        for _ in range(4):
            tick()
        done.append("good")

    def bad(tick):
        tick()
        raise ValueError("broken loop")

    with pytest.raises(RuntimeError, match="'bad' failed: ValueError"):
        harness.interleave({"good": good, "bad": bad}, "bad")
    assert done == ["good"]


@pytest.mark.parametrize("median, ci, goal, better, expected", [
    (1.005, [0.99, 1.008], 1.01, "lower", "met, interval inside"),
    (1.005, [0.99, 1.02], 1.01, "lower", "met, interval crosses"),
    (1.02, [1.0, 1.03], 1.01, "lower", "missed"),
    (5.0, [4.8, 5.1], 3.0, "higher", "met, interval inside"),
    (2.9, [2.5, 3.2], 3.0, "higher", "missed"),
])
def test_verdicts(median, ci, goal, better, expected):
    assert harness.verdict(median, ci, goal, better) == expected
