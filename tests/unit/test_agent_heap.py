"""The agent's C heap policy (agent/heap.py): thresholds set once, a full trim after start and
then at most every trim_every seconds."""

from __future__ import annotations

from typing import Any

from kvmeter.agent.heap import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, Heap, _libc


class FakeLibc:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def mallopt(self, parameter: int, value: int) -> int:
        self.calls.append(("mallopt", parameter, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


def test_thresholds_then_a_trim_after_start_and_one_per_interval() -> None:
    libc, now = FakeLibc(), [100.0]
    heap = Heap(keep_bytes=3 << 20, trim_every=60.0, clock=lambda: now[0], libc=libc)
    heap.keep()
    assert libc.calls == [("mallopt", M_TRIM_THRESHOLD, 3 << 20), ("mallopt", M_MMAP_THRESHOLD, 3 << 20)]
    libc.calls.clear()
    heap.release()  # after start
    trims = []
    for _ in range(70):  # polls every 2 s for 140 s
        now[0] += 2.0
        heap.after_poll()
        trims.append(len(libc.calls))
    assert libc.calls == [("malloc_trim", 0)] * 3  # at start, then at 160 s and 220 s
    assert trims.index(2) == 29
    assert trims.index(3) == 59


def test_a_first_poll_without_a_start_trims() -> None:
    libc = FakeLibc()
    Heap(libc=libc, clock=lambda: 0.0).after_poll()
    assert libc.calls == [("malloc_trim", 0)]


def test_glibc_takes_the_thresholds() -> None:
    libc = _libc()
    assert libc is not None  # the agent runs on glibc (Debian, EL)
    assert libc.mallopt(M_TRIM_THRESHOLD, 4 << 20) == 1
    assert libc.mallopt(M_MMAP_THRESHOLD, 4 << 20) == 1
