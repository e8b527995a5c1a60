"""Lifecycle events as stored: each event once by id, in time order per resource."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from kvmeter.collector.schema import collector_state, lifecycle_events
from kvmeter.collector.store import sequence
from kvmeter.collector.store.engine import StoreCore, slices

log = logging.getLogger(__name__)

# How often a replica looks for events stored without a seq (number_stragglers): an index lookup.
STRAGGLER_CHECK_S = 2.0
_EVENT_COLUMNS = ("event_id", "resource_uuid", "time_ms", "raw", "normalized", "record_key", "received_ms")


class LifecycleEvents(StoreCore):
    """Lifecycle events: the payload once as received (raw, and the record key where it is not
    the resource uuid) and the part of the event histories read (normalized; schema.py)."""

    def insert_events(
        self,
        conn: Connection,
        events: Sequence[tuple[str, str, int, bytes, bytes, bytes | None]],
        now_ms: int,
    ) -> set[str]:
        """Store events (event_id, resource, time_ms, raw, normalized, record key or None) unless
        known, the first of repeated ids; returns the ids stored now. A few statements for any
        number of events. Their seqs are given at the commit (store/sequence.py)."""
        rows: dict[str, dict[str, Any]] = {}
        for event_id, resource, time_ms, raw, normalized, record_key in events:
            if event_id not in rows:
                rows[event_id] = {
                    "event_id": event_id,
                    "resource_uuid": resource,
                    "time_ms": time_ms,
                    "raw": raw,
                    "normalized": normalized,
                    "record_key": record_key,
                    "received_ms": now_ms,
                }
        if not rows:
            return set()
        if self.is_postgres:
            # One INSERT over one array per column; RETURNING names the rows this transaction
            # inserted (a concurrent replica's insert of the same id waits, then conflicts).
            sql = self._sql_cache.get("lifecycle_events")
            if sql is None:
                sql = self._sql_cache["lifecycle_events"] = (
                    f"INSERT INTO lifecycle_events ({', '.join(_EVENT_COLUMNS)}) "
                    f"{self._pg_unnest(lifecycle_events, _EVENT_COLUMNS)} "
                    "ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
                )
            arrays = tuple([r[c] for r in rows.values()] for c in _EVENT_COLUMNS)
            stored = {row[0] for row in conn.exec_driver_sql(sql, arrays)}
            if stored:
                sequence.mark_pending(conn, sequence.EVENTS)
            return stored
        new: set[str] = set()
        ev = lifecycle_events.c
        insert = (
            "INSERT INTO lifecycle_events (" + ", ".join(_EVENT_COLUMNS) + ") VALUES (?, ?, ?, ?, ?, ?, ?)"
        )
        for part in slices(list(rows)):  # writers are serialised (BEGIN IMMEDIATE): what is not there is new
            known = {row[0] for row in conn.execute(sa.select(ev.event_id).where(ev.event_id.in_(part)))}
            fresh = [tuple(rows[i][c] for c in _EVENT_COLUMNS) for i in part if i not in known]
            if fresh:
                conn.exec_driver_sql(insert, fresh)
                new.update(row[0] for row in fresh)
        if new:
            sequence.mark_pending(conn, sequence.EVENTS)
        return new

    straggler_check_s = STRAGGLER_CHECK_S
    _stragglers_checked = float("-inf")  # monotonic

    def number_stragglers(self) -> int:
        """Number events committed without a seq, at most every straggler_check_s; returns how
        many. An older replica of a rolling upgrade (code before migration 24) stores events
        without one, and every sync, rebuild and residency lookup pages by seq: unnumbered, no
        other replica would learn them until some replica next stored an event."""
        if time.monotonic() - self._stragglers_checked < self.straggler_check_s:
            return 0
        self._stragglers_checked = time.monotonic()
        ev = lifecycle_events.c
        with self.read() as conn:
            if conn.execute(sa.select(ev.id).where(ev.seq.is_(None)).limit(1)).first() is None:
                return 0
        with self.write() as conn:
            numbered = sequence.number_stragglers(conn)
        if numbered:
            log.info("numbered %d lifecycle events an older replica stored without a seq", numbered)
        return numbered

    def events_of_many(self, conn: Connection, resources: Iterable[str]) -> dict[str, list[bytes]]:
        """{resource: normalized events in (time, event id) order} of the resources named."""
        ev = lifecycle_events.c
        out: dict[str, list[bytes]] = {}
        for part in slices(sorted(set(resources))):
            query = (
                sa.select(ev.resource_uuid, ev.normalized)
                .where(ev.resource_uuid.in_(part))
                .order_by(ev.resource_uuid, ev.time_ms, ev.event_id)
            )
            for row in conn.execute(query):
                out.setdefault(row[0], []).append(bytes(row[1]))
        return out

    def event_ids_of_many(self, conn: Connection, resources: Iterable[str]) -> dict[str, set[str]]:
        """{resource: ids of its stored events} of the resources named (no payloads)."""
        ev = lifecycle_events.c
        out: dict[str, set[str]] = {}
        for part in slices(sorted(set(resources))):
            query = sa.select(ev.resource_uuid, ev.event_id).where(ev.resource_uuid.in_(part))
            for row in conn.execute(query):
                out.setdefault(row[0], set()).add(row[1])
        return out

    def events_since(
        self, conn: Connection, last_seq: int, limit: int = 10000
    ) -> list[tuple[int, str, bytes, str]]:
        """(seq, resource, normalized, event id) of events committed after seq `last_seq`, in
        commit order: a page never steps over an event another replica commits later."""
        ev = lifecycle_events.c
        query = (
            sa.select(ev.seq, ev.resource_uuid, ev.normalized, ev.event_id)
            .where(ev.seq > last_seq)
            .order_by(ev.seq)
            .limit(limit)
        )
        return [(int(r[0]), r[1], bytes(r[2]), r[3]) for r in conn.execute(query)]

    def raw_events_after(
        self, conn: Connection, last_seq: int, limit: int = 1000
    ) -> list[tuple[int, int, bytes, bytes | None, str, bytes]]:
        """(seq, id, raw payload, record key kept, resource, normalized) of events committed
        after seq `last_seq`, in commit order: the payloads as received, for a rebuild to parse
        again (while replicas still write the live store)."""
        ev = lifecycle_events.c
        query = (
            sa.select(ev.seq, ev.id, ev.raw, ev.record_key, ev.resource_uuid, ev.normalized)
            .where(ev.seq > last_seq)
            .order_by(ev.seq)
            .limit(limit)
        )
        return [
            (int(r[0]), int(r[1]), bytes(r[2]), None if r[3] is None else bytes(r[3]), r[4], bytes(r[5]))
            for r in conn.execute(query)
        ]

    def input_position(self, conn: Connection, name: str) -> int:
        """An input's stored place in its source (the events file's delivery order), 0 if none."""
        query = sa.select(collector_state.c.value).where(collector_state.c.name == name)
        return int(conn.execute(query).scalar() or 0)

    def set_input_position(self, conn: Connection, name: str, value: int, *, rising: bool = False) -> None:
        """Store an input's place, kept with the events it delivered; `rising`: never lowered (a
        delivery order's high-water mark: a chunk applied again record by record writes it again)."""
        st = collector_state.c
        current = conn.execute(sa.select(st.value).where(st.name == name)).first()
        if current is None:
            conn.execute(sa.insert(collector_state).values(name=name, value=value))
        elif not rising or current[0] < value:
            conn.execute(sa.update(collector_state).where(st.name == name).values(value=value))
