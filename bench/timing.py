"""Timing helpers: interleaved rounds and robust summaries.

Methods compared side by side run in the same rounds, in a shuffled order per round, so that a
noisy neighbour slows all of them alike; medians over rounds discard the odd preempted round.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Samples:
    """Per-round CPU and wall seconds of one method (one round = one call)."""

    cpu: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)

    def summary(self, scale: float = 1.0) -> dict[str, float]:
        """Medians (and spread) in seconds, multiplied by `scale` (e.g. an extrapolation factor)."""
        return {
            "cpu_s": statistics.median(self.cpu) * scale,
            "wall_s": statistics.median(self.wall) * scale,
            "cpu_min_s": min(self.cpu) * scale,
            "cpu_max_s": max(self.cpu) * scale,
            "rounds": len(self.cpu),
        }


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(cpu seconds, wall seconds, result) of one call. CPU time counts kernel time spent for us
    (reading /proc is mostly that) and not the time a neighbour holds the core."""
    c0, w0 = time.process_time(), time.perf_counter()
    result = fn()
    return time.process_time() - c0, time.perf_counter() - w0, result


def interleaved(
    methods: Mapping[str, Callable[[], Any]],
    rounds: int,
    *,
    between: Callable[[], None] | None = None,
    only_every: Mapping[str, int] | None = None,
    seed: int = 7,
) -> dict[str, Samples]:
    """Run every method once per round in a shuffled order; `between` runs (untimed) before each
    round; `only_every[name] = k` runs a slow method only every k-th round."""
    rng = random.Random(seed)
    samples = {name: Samples() for name in methods}
    only_every = only_every or {}
    for r in range(rounds):
        if between is not None:
            between()
        order = [n for n in methods if r % only_every.get(n, 1) == 0]
        rng.shuffle(order)
        for name in order:
            cpu, wall, _ = timed(methods[name])
            samples[name].cpu.append(cpu)
            samples[name].wall.append(wall)
    return samples


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; values need not be sorted."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
