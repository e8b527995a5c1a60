"""Which measure batches to apply: each stream's high-water mark plus the gaps it skipped.

Batches of one agent incarnation (a stream) carry seq 1, 2, 3, ... A batch above the mark is
new; one at or below it is new only when it fills a recorded gap (out-of-order delivery), else
it is a duplicate and changes nothing. The store keeps marks and gaps in the same transaction
as the usage they guard.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from kvmeter.collector.decode import DecodedBatch

log = logging.getLogger(__name__)


def irregular(batches: Sequence[DecodedBatch], marks: Mapping[str, int]) -> set[str]:
    """Streams whose batches here do not simply continue their mark (the common case needs no
    look at gaps): duplicates, late arrivals, jumps. Batches sorted by (stream, seq)."""
    expected: dict[str, int] = {}
    odd: set[str] = set()
    for b in batches:
        want = expected.get(b.stream_id, marks.get(b.stream_id, 0) + 1)
        if b.seq != want:
            odd.add(b.stream_id)
        expected[b.stream_id] = b.seq + 1
    return odd


def admit(
    batches: Sequence[DecodedBatch],
    marks: Mapping[str, int],
    gaps: Mapping[str, list[tuple[int, int]]],
) -> tuple[list[DecodedBatch], dict[str, tuple[str, int]], dict[str, list[tuple[int, int]]], int]:
    """Which batches to apply, given each stream's high-water mark and its known gaps.

    A batch above the mark is new (skipping past seqs opens a gap); one at or below it is new
    only if it fills a gap (out-of-order delivery), else a duplicate. No I/O; batches sorted by
    (stream, seq). Returns (admitted, new marks {stream: (host, seq)}, changed gaps, duplicates).
    """
    admitted: list[DecodedBatch] = []
    new_marks: dict[str, tuple[str, int]] = {}
    changed: dict[str, list[tuple[int, int]]] = {}
    duplicates = 0
    for b in batches:
        mark = new_marks[b.stream_id][1] if b.stream_id in new_marks else marks.get(b.stream_id, 0)
        holes = changed.get(b.stream_id, gaps.get(b.stream_id, []))
        if b.seq > mark:
            if b.seq > mark + 1:
                log.warning("stream %s: batches %d..%d missing so far", b.stream_id, mark + 1, b.seq - 1)
                changed[b.stream_id] = [*holes, (mark + 1, b.seq - 1)]
            new_marks[b.stream_id] = (b.host_id, b.seq)
            admitted.append(b)
            continue
        hole = next((h for h in holes if h[0] <= b.seq <= h[1]), None)
        if hole is None:
            duplicates += 1
            continue
        rest = [h for h in holes if h != hole]
        rest += [r for r in ((hole[0], b.seq - 1), (b.seq + 1, hole[1])) if r[0] <= r[1]]
        changed[b.stream_id] = sorted(rest)
        admitted.append(b)
    return admitted, new_marks, changed, duplicates
