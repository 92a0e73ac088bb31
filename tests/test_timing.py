"""Paired timing (graphopt.backends.timing), on a fake clock: the runners advance it by what they
"take", so the tests check the method (warm-up, shuffled rounds, cutoff, budget, failures), not
this machine's speed."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from graphopt.backends.timing import time_paired


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def runner(self, label: str, seconds: float) -> Callable[[], None]:
        def run() -> None:
            self.calls.append(label)
            self.now += seconds

        return run


def test_every_runner_runs_once_per_round_in_a_shuffled_order():
    clock = FakeClock()
    labels = ["a", "b", "c", "d"]
    runners = {label: clock.runner(label, 0.01) for label in labels}
    rounds: list[int] = []
    result = time_paired(runners, rounds=12, warmup=2, clock=clock, on_round=rounds.append)
    assert result.rounds == 12 and rounds == list(range(1, 13))
    assert clock.calls[:8] == ["a", "a", "b", "b", "c", "c", "d", "d"]  # warm-up
    timed = [clock.calls[8 + 4 * i : 12 + 4 * i] for i in range(12)]
    assert all(sorted(order) == labels for order in timed)
    assert len({tuple(order) for order in timed}) > 3  # not a fixed rotation
    assert {label: len(t) for label, t in result.times_ms.items()} == dict.fromkeys(labels, 12)
    assert all(t == pytest.approx(10.0) for times in result.times_ms.values() for t in times)


def test_a_runner_over_the_cutoff_stops_after_min_rounds():
    clock = FakeClock()
    runners = {"fast": clock.runner("fast", 0.01), "slow": clock.runner("slow", 0.2)}
    result = time_paired(runners, rounds=10, warmup=0, min_rounds=3, cutoff=5.0, clock=clock)
    assert result.cut == {"slow": 3}
    assert len(result.times_ms["slow"]) == 3 and len(result.times_ms["fast"]) == 10


def test_warm_up_stops_after_warmup_s_and_no_round_starts_after_the_budget():
    clock = FakeClock()
    result = time_paired(
        {"x": clock.runner("x", 1.5)}, rounds=50, warmup=5, warmup_s=2.0, min_rounds=2,
        budget_s=10.0, clock=clock,
    )  # fmt: skip
    assert clock.calls.count("x") == 2 + result.rounds  # 2 warm-up runs: 3 s > 2 s after the 2nd
    assert result.rounds == 7  # the 8th round would start after 10.5 s of timed rounds


def test_a_failing_runner_is_dropped_with_its_error_or_the_error_propagates():
    clock = FakeClock()
    count = {"n": 0}

    def flaky() -> None:
        count["n"] += 1
        clock.now += 0.01
        if count["n"] == 4:
            raise RuntimeError("out of memory")

    runners = {"ok": clock.runner("ok", 0.01), "flaky": flaky}
    result = time_paired(runners, rounds=6, warmup=1, catch=True, clock=clock)
    assert str(result.failed["flaky"]) == "out of memory"
    assert result.times_ms["flaky"] == [] and len(result.times_ms["ok"]) == 6
    count["n"] = 0
    with pytest.raises(RuntimeError, match="out of memory"):
        time_paired(runners, rounds=6, warmup=1, clock=clock)
