"""Which measure batches the collector applies: stream high-water marks plus gaps, so that
duplicates change nothing and out-of-order delivery loses nothing."""

from __future__ import annotations

import pytest

from kvmeter.collector.decode import DecodedBatch
from kvmeter.collector.streams import admit


def batches(*seqs: int, stream: str = "s") -> list[DecodedBatch]:
    return [DecodedBatch(stream, seq, "h", "b", 0, False) for seq in sorted(seqs)]


@pytest.mark.parametrize(
    ("seqs", "mark", "gaps", "applied", "new_mark", "new_gaps", "duplicates"),
    [
        ((1, 2, 3), 0, [], [1, 2, 3], 3, None, 0),  # in order
        ((2, 3), 3, [], [], None, None, 2),  # already applied
        ((2, 2, 3), 1, [], [2, 3], 3, None, 1),  # a duplicate inside one chunk
        ((5,), 2, [], [5], 5, [(3, 4)], 0),  # a jump opens a gap
        ((3,), 5, [(3, 4)], [3], None, [(4, 4)], 0),  # a late batch fills part of it
        ((4,), 5, [(4, 4)], [4], None, [], 0),  # ... and closes it
        ((7,), 9, [(5, 8)], [7], None, [(5, 6), (8, 8)], 0),  # splits a gap
        ((7, 7), 9, [(5, 8)], [7], None, [(5, 6), (8, 8)], 1),  # filled once only
        ((2,), 9, [(5, 8)], [], None, None, 1),  # below the mark, in no gap: duplicate
        ((4, 8), 2, [], [4, 8], 8, [(3, 3), (5, 7)], 0),  # two jumps in one chunk
    ],
)
def test_admit(
    seqs: tuple[int, ...],
    mark: int,
    gaps: list[tuple[int, int]],
    applied: list[int],
    new_mark: int | None,
    new_gaps: list[tuple[int, int]] | None,
    duplicates: int,
) -> None:
    got, marks, changed, dups = admit(batches(*seqs), {"s": mark}, {"s": gaps})
    assert [b.seq for b in got] == applied
    assert marks.get("s", (None, None))[1] == new_mark
    assert changed.get("s") == new_gaps
    assert dups == duplicates


def test_streams_are_independent() -> None:
    got, marks, _, dups = admit(batches(1, stream="a") + batches(1, 2, stream="b"), {"a": 1}, {})
    assert [(b.stream_id, b.seq) for b in got] == [("b", 1), ("b", 2)]
    assert marks == {"b": ("h", 2)}
    assert dups == 1
