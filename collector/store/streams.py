"""Stream marks and gaps: the highest applied batch of each agent stream and the batches still
missing below it, so that a batch is applied once and a lost one is noticed."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from kvmeter.collector.schema import stream_gaps, stream_marks
from kvmeter.collector.store.engine import StoreCore


class StreamMarks(StoreCore):
    """Marks and gaps, read and written under the stream's row lock in the applying transaction."""

    def lock_marks(self, conn: Connection, streams: Mapping[str, str]) -> dict[str, int]:
        """Highest applied seq per stream ({stream_id: host_id} in), locked until commit."""
        if not streams:
            return {}
        ids = sorted(streams)
        if self.is_postgres:
            # Create missing rows first so that FOR UPDATE has something to lock.
            stmt = self._insert(stream_marks).on_conflict_do_nothing(index_elements=["stream_id"])
            conn.execute(
                stmt, [{"stream_id": s, "host_id": streams[s], "seq": 0, "updated_ms": 0} for s in ids]
            )
        query = sa.select(stream_marks.c.stream_id, stream_marks.c.seq).where(
            stream_marks.c.stream_id.in_(ids)
        )
        if self.is_postgres:
            query = query.order_by(stream_marks.c.stream_id).with_for_update()
        return {row[0]: int(row[1]) for row in conn.execute(query)}

    def set_marks(self, conn: Connection, marks: Mapping[str, tuple[str, int]], now_ms: int) -> None:
        """marks: {stream_id: (host_id, seq)}; only ever raises a mark."""
        if not marks:
            return
        stmt = self._insert(stream_marks)
        stmt = stmt.on_conflict_do_update(
            index_elements=["stream_id"],
            set_={
                "seq": sa.case(
                    (stmt.excluded.seq > stream_marks.c.seq, stmt.excluded.seq), else_=stream_marks.c.seq
                ),
                "host_id": stmt.excluded.host_id,
                "updated_ms": stmt.excluded.updated_ms,
            },
        )
        rows = [
            {"stream_id": s, "host_id": marks[s][0], "seq": marks[s][1], "updated_ms": now_ms}
            for s in sorted(marks)
        ]
        conn.execute(stmt, rows)

    def gaps_of(self, conn: Connection, streams: Iterable[str]) -> dict[str, list[tuple[int, int]]]:
        """Missing seq ranges (inclusive) per stream; call after lock_marks (the mark row lock
        guards the stream's gaps too)."""
        ids = sorted(set(streams))
        out: dict[str, list[tuple[int, int]]] = {s: [] for s in ids}
        if ids:
            g = stream_gaps.c
            query = (
                sa.select(g.stream_id, g.first_seq, g.last_seq)
                .where(g.stream_id.in_(ids))
                .order_by(g.first_seq)
            )
            for row in conn.execute(query):
                out[row[0]].append((int(row[1]), int(row[2])))
        return out

    def set_gaps(self, conn: Connection, gaps: Mapping[str, Sequence[tuple[int, int]]]) -> None:
        for stream in sorted(gaps):
            conn.execute(sa.delete(stream_gaps).where(stream_gaps.c.stream_id == stream))
            rows = [{"stream_id": stream, "first_seq": a, "last_seq": b} for a, b in gaps[stream]]
            if rows:
                conn.execute(sa.insert(stream_gaps), rows)
