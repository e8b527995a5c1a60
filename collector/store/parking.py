"""Measures held back: parked (no owner yet) and quarantined (implausible), each kept with what
is needed to act on it later. Dead letters (input that could not be read) are dead_letters'."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from kvmeter.collector.model import Measure
from kvmeter.collector.schema import parked_measures, quarantined_measures
from kvmeter.collector.store.engine import StoreCore


def measure_json(measure: Measure) -> str:
    return json.dumps(asdict(measure), separators=(",", ":"), sort_keys=True)


def measure_from_json(text: str) -> Measure:
    return Measure(**json.loads(text))


class Parking(StoreCore):
    """Parked and quarantined measures: each row written once (by its key)."""

    # -- parked and quarantined measures ------------------------------------------------------
    def park(self, conn: Connection, measures: Sequence[Measure], now_ms: int) -> None:
        if measures:
            stmt = self._insert(parked_measures).on_conflict_do_nothing(
                index_elements=["stream_id", "seq", "idx"]
            )
            conn.execute(stmt, [{**_measure_row(m), "parked_ms": now_ms} for m in measures])

    def quarantine(self, conn: Connection, measures: Sequence[Measure], now_ms: int) -> None:
        if measures:
            stmt = self._insert(quarantined_measures).on_conflict_do_nothing(
                index_elements=["stream_id", "seq", "idx"]
            )
            rows = [
                {**_measure_row(m), "reason": m.quarantine_reason[:256], "created_ms": now_ms}
                for m in measures
            ]
            conn.execute(stmt, rows)

    def take_parked(
        self,
        conn: Connection,
        *,
        instances: Iterable[str] = (),
        macs: Iterable[str] = (),
        addresses: Iterable[str] = (),
        after_id: int = 0,
        limit: int = 5000,
        start_before: int | None = None,
    ) -> list[tuple[int, Measure, bool]]:
        """Parked measures matching any identity (all when none given) and starting before
        `start_before` if given, locked for this transaction; another replica skips them and
        finds them gone after commit. Rows are (id, measure, already reported as unattributed)."""
        pm = parked_measures.c
        query = (
            sa.select(pm.id, pm.measure, pm.reported_ms).where(pm.id > after_id).order_by(pm.id).limit(limit)
        )
        conditions = []
        for column, values in ((pm.instance_uuid, instances), (pm.mac, macs), (pm.address, addresses)):
            wanted = sorted({v for v in values if v})
            if wanted:
                conditions.append(column.in_(wanted))
        if conditions:
            query = query.where(sa.or_(*conditions))
        elif instances or macs or addresses:
            return []
        if start_before is not None:
            query = query.where(pm.start_ms < start_before)
        if self.is_postgres:
            query = query.with_for_update(skip_locked=True)
        return [(int(r[0]), measure_from_json(r[1]), r[2] is not None) for r in conn.execute(query)]

    def take_unreported(
        self, conn: Connection, parked_before_ms: int, limit: int = 5000
    ) -> list[tuple[int, Measure]]:
        """Parked measures older than the horizon not yet reported as unattributed (locked)."""
        pm = parked_measures.c
        query = (
            sa.select(pm.id, pm.measure)
            .where(pm.parked_ms < parked_before_ms, pm.reported_ms.is_(None))
            .order_by(pm.id)
            .limit(limit)
        )
        if self.is_postgres:
            query = query.with_for_update(skip_locked=True)
        return [(int(r[0]), measure_from_json(r[1])) for r in conn.execute(query)]

    def mark_reported(self, conn: Connection, ids: Sequence[int], now_ms: int) -> None:
        for start in range(0, len(ids), 1000):
            conn.execute(
                sa.update(parked_measures)
                .where(parked_measures.c.id.in_(ids[start : start + 1000]))
                .values(reported_ms=now_ms)
            )

    def delete_parked(self, conn: Connection, ids: Sequence[int]) -> None:
        for start in range(0, len(ids), 1000):
            conn.execute(
                sa.delete(parked_measures).where(parked_measures.c.id.in_(ids[start : start + 1000]))
            )


def _measure_row(m: Measure) -> dict[str, Any]:
    return {
        "stream_id": m.stream_id,
        "seq": m.seq,
        "idx": m.index,
        "instance_uuid": m.instance_uuid,
        "mac": m.mac,
        "address": m.address,
        "start_ms": m.start_ms,
        "end_ms": m.end_ms,
        "direction": m.direction,
        "traffic_type": m.traffic_type,
        "bytes": m.bytes,
        "measure": measure_json(m),
    }
