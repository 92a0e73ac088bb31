"""Paired timing: run several engines on the same work, round after round, and compare medians.

The method of `../shared/notes/benchmarking.md`, shared by `--target auto` and every script under
`bench/`. Each runner first warms up (`warmup` runs, `warmup_s` seconds at most), then runs once
per round, in a new seeded random order each round: drift in machine speed hits all alike, and no
runner always follows the same one (an engine leaves the next a slower machine: worker threads
winding down, evicted caches; with a fixed rotation the ONNX Runtime session after TVM's ran 20%
slower than the same session after its own). After `min_rounds` rounds a runner still `cutoff`
times slower than the fastest median stops being timed (untuned TVM code can take seconds per run
and cannot win), and no new round starts once `budget_s` seconds of timed rounds have passed.

With `catch=True` a runner that raises is dropped and its error kept; otherwise the error
propagates.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PairedTimes", "time_paired"]


@dataclass
class PairedTimes:
    """Milliseconds of each runner's timed runs, the rounds run, and per runner why it stopped
    early: `cut` (slower than the cutoff: the runs it had) or `failed` (the error it raised)."""

    times_ms: dict[str, list[float]]
    rounds: int = 0
    cut: dict[str, int] = field(default_factory=dict)
    failed: dict[str, Exception] = field(default_factory=dict)


def time_paired(
    runners: Mapping[str, Callable[[], Any]],
    *,
    rounds: int = 30,
    warmup: int = 5,
    warmup_s: float = 2.0,
    min_rounds: int = 3,
    cutoff: float = 5.0,
    budget_s: float = float("inf"),
    catch: bool = False,
    on_round: Callable[[int], None] | None = None,
    seed: int = 0,
    clock: Callable[[], float] = time.perf_counter,
) -> PairedTimes:
    """Time `runners` (label -> callable) paired in shuffled rounds; see the module docstring.
    `on_round(done)` is called after every round (a progress bar); `clock` gives seconds."""
    result = PairedTimes({label: [] for label in runners})
    active = list(runners)

    def run(label: str) -> float | None:
        start = clock()
        try:
            runners[label]()
        except Exception as error:
            if not catch:
                raise
            result.failed[label] = error
            result.times_ms[label].clear()
            active.remove(label)
            return None
        return (clock() - start) * 1e3

    for label in list(active):
        start = clock()
        for _ in range(warmup):
            if run(label) is None or clock() - start > warmup_s:
                break
    shuffle = random.Random(seed).shuffle
    start = clock()
    while result.rounds < rounds and active:
        if result.rounds >= min_rounds and clock() - start > budget_s:
            break
        order = list(active)
        shuffle(order)
        for label in order:
            elapsed = run(label)
            if elapsed is not None:
                result.times_ms[label].append(elapsed)
        result.rounds += 1
        if on_round is not None:
            on_round(result.rounds)
        if result.rounds >= min_rounds and len(active) > 1:
            medians = {a: statistics.median(result.times_ms[a]) for a in active}
            best = min(medians.values())
            for label in [a for a in active if medians[a] > cutoff * best]:
                active.remove(label)
                result.cut[label] = len(result.times_ms[label])
    return result
