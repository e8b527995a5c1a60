"""UTC windows and the exact byte split across them."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmeter.collector import errors
from kvmeter.collector.errors import BadInput
from kvmeter.collector.windows import DAY_MS, check_window, split_bytes, window_start, windows_between

H = 3_600_000
T0 = 1_715_680_800_000  # 2024-05-14T10:00:00Z, on an hour boundary


def ms(*parts: int) -> int:
    return int(dt.datetime(*parts, tzinfo=dt.UTC).timestamp()) * 1000


def test_t0_is_an_hour_boundary() -> None:
    assert ms(2024, 5, 14, 10) == T0


@pytest.mark.parametrize("window", [1, 1000, 60_000, 300_000, 900_000, H, 2 * H, 6 * H, DAY_MS])
def test_divisors_of_a_day_are_accepted(window: int) -> None:
    check_window(window)


@pytest.mark.parametrize("window", [0, -H, 7 * H, 7_000, 2 * DAY_MS, 3_600_001])
def test_other_lengths_are_rejected(window: int) -> None:
    with pytest.raises(BadInput) as info:
        check_window(window)
    assert info.value.reason == errors.BAD_WINDOW


# start, end, window, expected windows
WINDOWS = [
    (T0, T0 + H, H, [(T0, T0 + H)]),  # exactly one window
    (T0 + 10, T0 + 20, H, [(T0, T0 + H)]),
    (T0 + 10, T0 + 10, H, [(T0, T0 + H)]),  # zero length: the window holding start
    (T0 + H, T0 + H, H, [(T0 + H, T0 + 2 * H)]),  # zero length on a boundary: the next one
    (T0 - 1, T0 + 1, H, [(T0 - H, T0), (T0, T0 + H)]),
    (T0, T0 + H + 1, H, [(T0, T0 + H), (T0 + H, T0 + 2 * H)]),
    (T0 + 59 * 60_000, T0 + 3 * H, 15 * 60_000,
     [(T0 + 45 * 60_000 + i * 15 * 60_000, T0 + 60 * 60_000 + i * 15 * 60_000) for i in range(9)]),
    # across a month end with daily windows: April 30 and May 1 are separate
    (ms(2024, 4, 30, 23), ms(2024, 5, 1, 1), DAY_MS,
     [(ms(2024, 4, 30), ms(2024, 5, 1)), (ms(2024, 5, 1), ms(2024, 5, 2))]),
]  # fmt: skip


@pytest.mark.parametrize(("start", "end", "window", "expected"), WINDOWS)
def test_windows_between(start: int, end: int, window: int, expected: list[tuple[int, int]]) -> None:
    assert windows_between(start, end, window) == expected


def test_inverted_interval_is_rejected() -> None:
    with pytest.raises(BadInput) as info:
        windows_between(T0 + 1, T0, H)
    assert info.value.reason == errors.INVERTED_INTERVAL


def test_window_start_before_the_epoch_floors() -> None:
    assert window_start(-1, H) == -H
    assert window_start(0, H) == 0


# total, start, end, window, expected parts
SPLITS = [
    (1000, T0 + 10, T0 + 20, H, [(T0, T0 + H, 1000)]),
    (1000, T0 + 10, T0 + 10, H, [(T0, T0 + H, 1000)]),  # zero length
    (0, T0 - 10, T0 + 10, H, []),
    (10, T0 - 30, T0 + 10, H, [(T0 - H, T0, 8), (T0, T0 + H, 2)]),  # 7.5 / 2.5 -> tie: earlier wins
    (9, T0 - 10, T0 + 20, H, [(T0 - H, T0, 3), (T0, T0 + H, 6)]),
    (1, T0 - 10, T0 + 10, H, [(T0 - H, T0, 1)]),  # one byte, even halves: the earlier window
    (1, T0 - 10, T0 + 30, H, [(T0, T0 + H, 1)]),  # one byte: the larger share
    (2, T0 - 1, T0 + 2 * H + 1, H, [(T0, T0 + H, 1), (T0 + H, T0 + 2 * H, 1)]),
    (3, T0, T0 + 3 * H, H, [(T0 + i * H, T0 + (i + 1) * H, 1) for i in range(3)]),
    (10, T0, T0 + 3 * H, H, [(T0, T0 + H, 4), (T0 + H, T0 + 2 * H, 3), (T0 + 2 * H, T0 + 3 * H, 3)]),
]


@pytest.mark.parametrize(("total", "start", "end", "window", "expected"), SPLITS)
def test_split_bytes(
    total: int, start: int, end: int, window: int, expected: list[tuple[int, int, int]]
) -> None:
    assert split_bytes(total, start, end, window) == expected


def test_negative_bytes_are_rejected() -> None:
    with pytest.raises(BadInput) as info:
        split_bytes(-1, T0, T0 + 1, H)
    assert info.value.reason == errors.NEGATIVE_BYTES


WINDOW_LENGTHS = st.sampled_from([1000, 60_000, 300_000, H, 4 * H, DAY_MS])


@settings(deadline=None)  # a shared CI machine: correctness here, speed in bench/
@given(
    total=st.integers(0, 2**64),
    start=st.integers(T0 - 10 * DAY_MS, T0 + 10 * DAY_MS),
    length=st.integers(0, 3 * DAY_MS),
    window=WINDOW_LENGTHS,
)
def test_parts_add_up_to_the_byte(total: int, start: int, length: int, window: int) -> None:
    end = start + length
    if (length // window) > 500:
        end = start + 500 * window  # keep each example fast
    parts = split_bytes(total, start, end, window)
    assert sum(p for _, _, p in parts) == total
    spans = set(windows_between(start, end, window))
    for ws, we, part in parts:
        assert (ws, we) in spans
        assert part > 0
        assert we - ws == window
        assert ws % window == 0
        if end > start:  # each part is within one byte of its exact share
            overlap = min(we, end) - max(ws, start)
            assert abs(part * (end - start) - total * overlap) < end - start
    assert [p[0] for p in parts] == sorted({p[0] for p in parts})


@settings(deadline=None)
@given(
    total=st.integers(1, 10**12),
    start=st.integers(T0, T0 + DAY_MS),
    length=st.integers(1, 2 * DAY_MS),
)
def test_split_is_deterministic_and_bounded(total: int, start: int, length: int) -> None:
    end = start + length
    assert split_bytes(total, start, end, H) == split_bytes(total, start, end, H)
    # every window gets no more than the ceiling of its exact share
    for ws, we, part in split_bytes(total, start, end, H):
        overlap = min(we, end) - max(ws, start)
        assert part <= -(-total * overlap // length)
