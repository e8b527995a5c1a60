"""The usage store: one schema on SQLite (embedded default, a file) and PostgreSQL (a DSN).

SQLAlchemy Core only, so it runs on Debian 12's SQLAlchemy 1.4.46 and on 2.x. A plain
`postgresql://` URL uses psycopg 3 on SQLAlchemy 2 and psycopg2 on 1.4 (whose dialects predate
psycopg 3; Debian 12: python3-psycopg2); an explicit `postgresql+driver://` is kept. Every time is
an integer of milliseconds since the epoch (UTC): no timezone or datetime type differences
between the two databases.

Concurrency between replicas (PostgreSQL) rests on three locks, always taken in this order:
1. the `finalized_through` row of collector_state: shared by writers of usage, exclusive for
   the finalizer, so a window never turns final under a writer that saw it open;
2. per-resource advisory locks (sorted) for recomputing time-based records;
3. row locks of stream marks and parked measures (`FOR UPDATE`), so a batch or a parked
   measure is applied by one replica only.
SQLite serialises writers with `BEGIN IMMEDIATE` instead.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from kvmeter.collector.model import Measure, UsageKey
from kvmeter.collector.schema import (
    FINALIZED_THROUGH,
    KEY_COLUMNS,
    MIGRATIONS,
    TIME_TYPES,
    V1_TABLES,
    collector_state,
    dead_letters,
    lifecycle_events,
    metadata,
    owner_hints,
    parked_measures,
    quarantined_measures,
    schema_version,
    stream_gaps,
    stream_marks,
    unbilled_bytes,
    usage_adjustments,
    usage_records,
)

# Tables are re-exported: tests and tools reach them through the store.
__all__ = [
    "KEY_COLUMNS",
    "MIGRATIONS",
    "V1_TABLES",
    "Adjustment",
    "DeadLetter",
    "Store",
    "UsageRow",
    "collector_state",
    "dead_letters",
    "engine_url",
    "lifecycle_events",
    "metadata",
    "parked_measures",
    "quarantined_measures",
    "schema_version",
    "stream_gaps",
    "stream_marks",
    "unbilled_bytes",
    "usage_adjustments",
    "usage_records",
]


@dataclass(frozen=True)
class DeadLetter:
    source: str  # "measures" | "lifecycle"
    origin: str  # where it came from: topic/partition@offset or file:line
    raw: bytes
    reason: str
    message: str


@dataclass(frozen=True)
class UsageRow:
    """A usage record as reported: net quantity = recorded quantity + adjustments."""

    key: UsageKey
    quantity: int
    recorded: int
    adjustment: int
    final: bool
    resource_name: str
    device_type: str
    updated_ms: int


@dataclass(frozen=True)
class Adjustment:
    """A change to a final window's record (its net is record + all its adjustments)."""

    key: UsageKey
    delta: int
    reason: str  # "late bytes", "late lifecycle", "late attribution", "unattributed"
    created_ms: int


def _key_filters(
    cols: Any, start_ms: int, end_ms: int, account: str | None, usage_type: int | None, resource: str | None
) -> list[Any]:
    """WHERE terms on a table with the usage key columns: windows starting in [start, end)."""
    conds = [cols.window_start_ms >= start_ms, cols.window_start_ms < end_ms]
    for column, value in (("account", account), ("usage_type", usage_type), ("resource", resource)):
        if value is not None:
            conds.append(cols[column] == value)
    return conds


def engine_url(url: str) -> str:
    """Map plain `postgresql://` to the installed psycopg driver; keep other URLs as given."""
    if url.startswith(("postgresql://", "postgres://")):
        rest = url.split("://", 1)[1]
        # SQLAlchemy 2 has the psycopg 3 dialect; 1.4 (Debian 12) only psycopg2.
        driver = "psycopg" if int(sa.__version__.split(".")[0]) >= 2 else "psycopg2"
        return f"postgresql+{driver}://{rest}"
    return url


def resource_lock_id(resource: str) -> int:
    """A stable signed 64-bit id for pg_advisory_xact_lock."""
    return int.from_bytes(hashlib.blake2b(resource.encode(), digest_size=8).digest(), "big", signed=True)


def measure_json(measure: Measure) -> str:
    return json.dumps(asdict(measure), separators=(",", ":"), sort_keys=True)


def measure_from_json(text: str) -> Measure:
    return Measure(**json.loads(text))


def _now_ms() -> int:
    return int(time.time() * 1000)


class Store:
    def __init__(self, url: str, *, pool_size: int = 5):
        self.url = engine_url(url)
        if self.url.startswith("sqlite"):
            self.engine = _sqlite_engine(self.url)
        else:
            try:
                self.engine = sa.create_engine(self.url, pool_size=pool_size, pool_pre_ping=True)
            except (ImportError, sa.exc.NoSuchModuleError) as exc:
                driver = self.url.split("://", 1)[0]
                hint = " (Debian 12: apt install python3-psycopg2)" if driver.endswith("psycopg2") else ""
                raise RuntimeError(f"no database driver for {driver}{hint}: {exc}") from None
        self.dialect = self.engine.dialect.name
        self.is_postgres = self.dialect == "postgresql"
        self._sql_cache: dict[str, str] = {}  # statements built once, by purpose

    def close(self) -> None:
        self.engine.dispose()

    # -- transactions -------------------------------------------------------------------------
    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A read-write transaction (SQLite: BEGIN IMMEDIATE, one writer at a time)."""
        with self.engine.connect() as conn:
            conn = conn.execution_options(kvmeter_write=True)
            with conn.begin():
                yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    # -- schema -------------------------------------------------------------------------------
    def migrate(self) -> int:
        """Apply pending migrations; safe when several replicas start at once."""
        with self.write() as conn:
            if self.is_postgres:
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(7346201)"))
            schema_version.create(conn, checkfirst=True)
            done = {row[0] for row in conn.execute(sa.select(schema_version.c.version))}
            for version, migration in MIGRATIONS:
                if version not in done:
                    migration(conn)
                    conn.execute(sa.insert(schema_version).values(version=version, applied_ms=_now_ms()))
            return max([v for v, _ in MIGRATIONS] + list(done))

    def version(self) -> int:
        with self.read() as conn:
            return int(conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar() or 0)

    def _insert(self, table: sa.Table) -> Any:
        if self.is_postgres:
            return postgresql.insert(table)
        return sqlite.insert(table)

    # -- finalization watermark ---------------------------------------------------------------
    def finalized_through(self, conn: Connection, *, lock: bool = True) -> int:
        """All windows ending at or before this instant are final. Shared lock for writers."""
        stmt = sa.select(collector_state.c.value).where(collector_state.c.name == FINALIZED_THROUGH)
        if lock and self.is_postgres:
            stmt = stmt.with_for_update(read=True)
        return int(conn.execute(stmt).scalar() or 0)

    def finalize(self, conn: Connection, through_ms: int, now_ms: int) -> int:
        """Make every window ending at or before `through_ms` final; returns records finalized."""
        stmt = sa.select(collector_state.c.value).where(collector_state.c.name == FINALIZED_THROUGH)
        if self.is_postgres:
            stmt = stmt.with_for_update()
        current = int(conn.execute(stmt).scalar() or 0)
        if through_ms <= current:
            return 0
        conn.execute(
            sa.update(collector_state)
            .where(collector_state.c.name == FINALIZED_THROUGH)
            .values(value=through_ms)
        )
        result = conn.execute(
            sa.update(usage_records)
            .where(usage_records.c.final == sa.false(), usage_records.c.window_end_ms <= through_ms)
            .values(final=True, updated_ms=now_ms)
        )
        return int(result.rowcount or 0)

    # -- stream marks -------------------------------------------------------------------------
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

    def marks(self) -> dict[str, int]:
        with self.read() as conn:
            return {
                row[0]: int(row[1])
                for row in conn.execute(sa.select(stream_marks.c.stream_id, stream_marks.c.seq))
            }

    # -- byte usage (additive) ----------------------------------------------------------------
    def add_bytes(
        self,
        conn: Connection,
        increments: Mapping[UsageKey, int],
        names: Mapping[UsageKey, tuple[str, str]],
        final_through: int,
        now_ms: int,
        reason: str = "late bytes",
    ) -> tuple[int, int]:
        """Add byte increments; an increment to a final window becomes an adjustment row.

        names: {key: (resource_name, device_type)}. Returns (records upserted, adjustments).
        """
        open_rows: list[tuple[Any, ...]] = []
        late: dict[UsageKey, int] = {}
        no_name = ("", "")
        for key in sorted(increments):  # a fixed order: no deadlocks between replicas
            amount = increments[key]
            if amount == 0:
                continue
            if key.window_end_ms <= final_through:
                late[key] = amount
                continue
            name, device = names.get(key, no_name)
            open_rows.append((*key, amount, False, name, device, now_ms, now_ms))
        if open_rows:
            self._upsert_rows(conn, usage_records, _RECORD_COLUMNS, open_rows, "quantity", add=True)
        if late:
            self._adjust(conn, late, names, now_ms, reason)
        return len(open_rows), len(late)

    def add_unbilled(self, conn: Connection, increments: Mapping[UsageKey, int], now_ms: int) -> None:
        rows = [(*k, increments[k], now_ms) for k in sorted(increments) if increments[k]]
        if rows:
            self._upsert_rows(conn, unbilled_bytes, _UNBILLED_COLUMNS, rows, "bytes", add=True)

    def _upsert_rows(
        self,
        conn: Connection,
        table: sa.Table,
        columns: Sequence[str],
        rows: list[tuple[Any, ...]],
        value: str,
        *,
        add: bool,
    ) -> None:
        """Upsert plain tuples (values in `columns` order; the key first): a new key inserts its
        row, a known key adds the row's `value` column to its own (add) or takes it, and takes
        its updated_ms.

        The hot write path. The statement text is built once per table and run through the
        driver directly: SQLAlchemy's per-row parameter processing cost more than the
        database's work. SQLite: one prepared statement, executemany. PostgreSQL (psycopg 3 or
        psycopg2): one statement over one array per column (unnest), one round trip, and a
        short text the driver parses once (a multi-row VALUES is re-parsed on every call). The
        rows' keys are distinct: ON CONFLICT DO UPDATE may touch a row once per statement."""
        cache_key = f"{table.name}:{value}:{'add' if add else 'set'}"
        sql = self._sql_cache.get(cache_key)
        if sql is None:
            sql = self._sql_cache[cache_key] = self._upsert_sql(table, columns, value, add=add)
        if self.is_postgres:
            conn.exec_driver_sql(sql, [tuple(list(values) for values in zip(*rows, strict=True))])
        else:
            conn.exec_driver_sql(sql, rows)

    def _upsert_sql(self, table: sa.Table, columns: Sequence[str], value: str, *, add: bool) -> str:
        quote = self.engine.dialect.identifier_preparer.quote
        name, column = quote(table.name), quote(value)
        if self.is_postgres:
            source = self._pg_unnest(table, columns)
        else:
            source = "VALUES (" + ", ".join(["?"] * len(columns)) + ")"
        new_value = f"{name}.{column} + excluded.{column}" if add else f"excluded.{column}"
        return (
            f"INSERT INTO {name} ({', '.join(quote(c) for c in columns)}) {source} "
            f"ON CONFLICT ({', '.join(quote(c) for c in KEY_COLUMNS)}) DO UPDATE SET "
            f"{column} = {new_value}, {quote('updated_ms')} = excluded.{quote('updated_ms')}"
        )

    # -- owner hints from the agents' inventories ----------------------------------------------
    def save_owner_hints(self, conn: Connection, hints: Mapping[str, Mapping[str, str]], now_ms: int) -> None:
        rows = [
            {"domain": d[:255], "owner": json.dumps(dict(hints[d]), sort_keys=True), "updated_ms": now_ms}
            for d in sorted(hints)
        ]
        if rows:
            stmt = self._insert(owner_hints)
            stmt = stmt.on_conflict_do_update(
                index_elements=["domain"], set_={"owner": stmt.excluded.owner, "updated_ms": now_ms}
            )
            conn.execute(stmt, rows)

    def owner_hints(self, conn: Connection) -> dict[str, dict[str, str]]:
        rows = conn.execute(sa.select(owner_hints.c.domain, owner_hints.c.owner))
        return {row[0]: json.loads(row[1]) for row in rows}

    def unbilled(self) -> dict[UsageKey, int]:
        """Bytes of non-billable traffic per key (non-zero only)."""
        u = unbilled_bytes.c
        with self.read() as conn:
            rows = conn.execute(sa.select(*(u[c] for c in KEY_COLUMNS), u.bytes).where(u.bytes != 0))
            return {UsageKey(*row[:7]): int(row[7]) for row in rows}

    def _adjust(
        self,
        conn: Connection,
        deltas: Mapping[UsageKey, int],
        names: Mapping[UsageKey, tuple[str, str]],
        now_ms: int,
        reason: str,
    ) -> None:
        """Adjustment rows for final windows; a key new to a final window gets a zero record
        (final) so that reports list it, with the whole amount as the adjustment."""
        keys = sorted(deltas)
        stmt = self._insert(usage_records).on_conflict_do_nothing(index_elements=list(KEY_COLUMNS))
        conn.execute(
            stmt,
            [
                {
                    **_key_dict(k),
                    "quantity": 0,
                    "final": True,
                    "resource_name": names.get(k, ("", ""))[0],
                    "device_type": names.get(k, ("", ""))[1],
                    "created_ms": now_ms,
                    "updated_ms": now_ms,
                }
                for k in keys
            ],
        )
        conn.execute(
            sa.insert(usage_adjustments),
            [{**_key_dict(k), "delta": deltas[k], "reason": reason, "created_ms": now_ms} for k in keys],
        )

    # -- time-based usage (whole values) ------------------------------------------------------
    def lock_resources(self, conn: Connection, resources: Iterable[str]) -> None:
        """Per-resource advisory locks, taken in resource order, in one round trip (unnest
        yields the array in order, and the aggregate takes each lock as its row comes)."""
        ids = [resource_lock_id(r) for r in sorted(set(resources))]
        if self.is_postgres and ids:
            conn.execute(
                sa.text("SELECT count(pg_advisory_xact_lock(k)) FROM unnest(CAST(:ids AS bigint[])) AS k"),
                {"ids": ids},
            )

    def set_time_values(
        self,
        conn: Connection,
        resource: str,
        values: Mapping[UsageKey, int],
        final_through: int,
        now_ms: int,
        *,
        open_only: bool = False,
    ) -> tuple[int, int]:
        """set_time_values_many for one resource."""
        return self.set_time_values_many(conn, {resource: values}, final_through, now_ms, open_only=open_only)

    def set_time_values_many(
        self,
        conn: Connection,
        values: Mapping[str, Mapping[UsageKey, int]],
        final_through: int,
        now_ms: int,
        *,
        open_only: bool = False,
    ) -> tuple[int, int]:
        """Make the stored time-based records of each resource equal its `values` (whole values;
        {resource: {key: quantity}}): a few statements for all of them.

        Open windows are updated in place (a zero value removes the record); a final window
        that differs from its net gets an adjustment. With open_only, only windows ending
        after `final_through` are considered (a tick: time alone changes nothing final).
        Call lock_resources first. Returns (records written, adjustments).
        """
        stored = self._time_records(conn, sorted(values), final_through if open_only else None)
        upserts: list[tuple[Any, ...]] = []
        deletes: list[int] = []
        late: dict[UsageKey, int] = {}
        for resource in sorted(values):
            wanted = {
                k: v for k, v in values[resource].items() if not open_only or k.window_end_ms > final_through
            }
            had = stored.get(resource, {})
            for key in sorted(set(wanted) | set(had)):
                new = wanted.get(key, 0)
                record = had.get(key)
                if key.window_end_ms <= final_through:
                    net = record[1] + record[2] if record else 0
                    if new != net:
                        late[key] = new - net
                elif record is None:
                    if new:
                        upserts.append((*key, new, False, "", "", now_ms, now_ms))
                elif new == 0:
                    deletes.append(record[0])
                elif new != record[1]:
                    upserts.append((*key, new, False, "", "", now_ms, now_ms))
        if upserts:  # tuples in _RECORD_COLUMNS order, distinct keys
            self._upsert_rows(conn, usage_records, _RECORD_COLUMNS, upserts, "quantity", add=False)
        for part in _slices(deletes):
            conn.execute(sa.delete(usage_records).where(usage_records.c.id.in_(part)))
        if late:
            self._adjust(conn, late, {}, now_ms, "late lifecycle")
        return len(upserts) + len(deletes), len(late)

    def _time_records(
        self, conn: Connection, resources: Sequence[str], after: int | None
    ) -> dict[str, dict[UsageKey, tuple[int, int, int]]]:
        """{resource: {key: (id, quantity, adjustments)}} of the resources' time-based records."""
        rec, adj = usage_records.c, usage_adjustments.c
        out: dict[str, dict[UsageKey, tuple[int, int, int]]] = {}
        for part in _slices(resources):
            query = sa.select(rec.id, rec.quantity, *(rec[c] for c in KEY_COLUMNS)).where(
                rec.resource.in_(part), rec.usage_type.in_(TIME_TYPES)
            )
            if after is not None:
                query = query.where(rec.window_end_ms > after)
            for row in conn.execute(query):
                key = UsageKey(*row[2:])
                out.setdefault(key.resource, {})[key] = (int(row[0]), int(row[1]), 0)
            if after is not None:  # adjustments exist for final windows only
                continue
            aq = (
                sa.select(*(adj[c] for c in KEY_COLUMNS), sa.func.sum(adj.delta))
                .where(adj.resource.in_(part), adj.usage_type.in_(TIME_TYPES))
                .group_by(*(adj[c] for c in KEY_COLUMNS))
            )
            for row in conn.execute(aq):
                key = UsageKey(*row[:7])
                records = out.get(key.resource, {})
                if key in records:
                    ident, quantity, _ = records[key]
                    records[key] = (ident, quantity, int(row[7]))
        return out

    # -- lifecycle events ---------------------------------------------------------------------
    def insert_event(
        self,
        conn: Connection,
        event_id: str,
        resource: str,
        time_ms: int,
        raw: bytes,
        normalized: bytes,
        now_ms: int,
    ) -> bool:
        """Store an event unless known; True when it is new."""
        return bool(self.insert_events(conn, [(event_id, resource, time_ms, raw, normalized)], now_ms))

    def insert_events(
        self, conn: Connection, events: Sequence[tuple[str, str, int, bytes, bytes]], now_ms: int
    ) -> set[str]:
        """Store events (event_id, resource, time_ms, raw, normalized) unless known, the first of
        repeated ids; returns the ids stored now. A few statements for any number of events."""
        rows: dict[str, dict[str, Any]] = {}
        for event_id, resource, time_ms, raw, normalized in events:
            if event_id not in rows:
                rows[event_id] = {
                    "event_id": event_id,
                    "resource_uuid": resource,
                    "time_ms": time_ms,
                    "raw": raw,
                    "normalized": normalized,
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
            return {row[0] for row in conn.exec_driver_sql(sql, arrays)}
        new: set[str] = set()
        ev = lifecycle_events.c
        insert = "INSERT INTO lifecycle_events (" + ", ".join(_EVENT_COLUMNS) + ") VALUES (?, ?, ?, ?, ?, ?)"
        for part in _slices(list(rows)):  # writers are serialised (BEGIN IMMEDIATE): what is not there is new
            known = {row[0] for row in conn.execute(sa.select(ev.event_id).where(ev.event_id.in_(part)))}
            fresh = [tuple(rows[i][c] for c in _EVENT_COLUMNS) for i in part if i not in known]
            if fresh:
                conn.exec_driver_sql(insert, fresh)
                new.update(row[0] for row in fresh)
        return new

    def _pg_unnest(self, table: sa.Table, columns: Sequence[str]) -> str:
        """`SELECT * FROM unnest(<one array parameter per column>)`: any number of rows in one
        statement whose text never changes. Arrays of the base types (text[], not
        varchar(n)[]: an explicit cast would truncate a long value silently; the insert's own
        assignment cast refuses it). psycopg 3 dumps arrays in binary (%b) at a third of its
        text format's cost."""
        mark = "%b" if self.engine.dialect.driver == "psycopg" else "%s"
        types = [
            "bytea" if isinstance(table.c[c].type, sa.LargeBinary) else _pg_array_type(table.c[c].type)
            for c in columns
        ]
        return "SELECT * FROM unnest(" + ", ".join(f"{mark}::{t}[]" for t in types) + ")"

    def events_of(self, conn: Connection, resource: str) -> list[bytes]:
        return self.events_of_many(conn, [resource]).get(resource, [])

    def events_of_many(self, conn: Connection, resources: Iterable[str]) -> dict[str, list[bytes]]:
        """{resource: normalized events in (time, event id) order} of the resources named."""
        ev = lifecycle_events.c
        out: dict[str, list[bytes]] = {}
        for part in _slices(sorted(set(resources))):
            query = (
                sa.select(ev.resource_uuid, ev.normalized)
                .where(ev.resource_uuid.in_(part))
                .order_by(ev.resource_uuid, ev.time_ms, ev.event_id)
            )
            for row in conn.execute(query):
                out.setdefault(row[0], []).append(bytes(row[1]))
        return out

    def events_since(
        self, conn: Connection, last_id: int, limit: int = 10000
    ) -> list[tuple[int, str, bytes, str]]:
        """(id, resource, normalized, event id) of events stored after `last_id`, by id."""
        ev = lifecycle_events.c
        query = (
            sa.select(ev.id, ev.resource_uuid, ev.normalized, ev.event_id)
            .where(ev.id > last_id)
            .order_by(ev.id)
            .limit(limit)
        )
        return [(int(r[0]), r[1], bytes(r[2]), r[3]) for r in conn.execute(query)]

    def resources(self, conn: Connection) -> list[str]:
        ev = lifecycle_events.c
        return [r[0] for r in conn.execute(sa.select(ev.resource_uuid).distinct().order_by(ev.resource_uuid))]

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
    ) -> list[tuple[int, Measure, bool]]:
        """Parked measures matching any identity (all when none given), locked for this
        transaction; another replica skips them and finds them gone after commit.
        Rows are (id, measure, already reported as unattributed)."""
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

    # -- dead letters -------------------------------------------------------------------------
    def dead_letter(self, conn: Connection, letters: Sequence[DeadLetter], now_ms: int) -> None:
        if not letters:
            return
        stmt = self._insert(dead_letters).on_conflict_do_nothing(index_elements=["digest"])
        rows = [
            {
                "digest": hashlib.sha256(d.source.encode() + b"\0" + d.raw).hexdigest(),
                "source": d.source,
                "origin": d.origin[:256],
                "raw": d.raw,
                "reason": d.reason[:64],
                "message": d.message,
                "created_ms": now_ms,
            }
            for d in letters
        ]
        conn.execute(stmt, rows)

    # -- reading ------------------------------------------------------------------------------
    def usage(
        self,
        start_ms: int,
        end_ms: int,
        *,
        account: str | None = None,
        usage_type: int | None = None,
        resource: str | None = None,
    ) -> list[UsageRow]:
        """Records whose window starts in [start_ms, end_ms), with net quantities."""
        rec, adj = usage_records.c, usage_adjustments.c
        conds = _key_filters(rec, start_ms, end_ms, account, usage_type, resource)
        adj_conds = _key_filters(adj, start_ms, end_ms, account, usage_type, resource)
        with self.read() as conn:
            adjustments = {
                UsageKey(*row[:7]): int(row[7])
                for row in conn.execute(
                    sa.select(*(adj[c] for c in KEY_COLUMNS), sa.func.sum(adj.delta))
                    .where(*adj_conds)
                    .group_by(*(adj[c] for c in KEY_COLUMNS))
                )
            }
            query = sa.select(
                *(rec[c] for c in KEY_COLUMNS),
                rec.quantity,
                rec.final,
                rec.resource_name,
                rec.device_type,
                rec.updated_ms,
            ).where(*conds)
            rows = []
            for row in conn.execute(query):
                key = UsageKey(*row[:7])
                extra = adjustments.get(key, 0)
                rows.append(
                    UsageRow(
                        key,
                        int(row[7]) + extra,
                        int(row[7]),
                        extra,
                        bool(row[8]),
                        row[9],
                        row[10],
                        int(row[11]),
                    )
                )
        rows.sort(
            key=lambda r: (r.key.window_start_ms, r.key.account, r.key.usage_type, r.key.resource, r.key)
        )
        return rows

    def adjustments(
        self, since_ms: int, until_ms: int = 2**62, *, account: str | None = None
    ) -> list[Adjustment]:
        """Adjustment rows created in [since_ms, until_ms): what changed in final windows, for a
        billing system that already took them."""
        adj = usage_adjustments.c
        query = (
            sa.select(*(adj[c] for c in KEY_COLUMNS), adj.delta, adj.reason, adj.created_ms, adj.id)
            .where(adj.created_ms >= since_ms, adj.created_ms < until_ms)
            .order_by(adj.id)
        )
        if account is not None:
            query = query.where(adj.account == account)
        with self.read() as conn:
            return [Adjustment(UsageKey(*r[:7]), int(r[7]), r[8], int(r[9])) for r in conn.execute(query)]

    def net_usage(self) -> dict[UsageKey, int]:
        """Net quantity per key over the whole store (non-zero only): the replay comparison."""
        return {row.key: row.quantity for row in self.usage(0, 2**62) if row.quantity}

    def stats(self, horizon_start_ms: int) -> dict[str, int]:
        """Gauges for /metrics: parked bytes (all, and older than the horizon = unattributed)."""
        pm = parked_measures.c
        with self.read() as conn:
            parked = conn.execute(
                sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(pm.bytes), 0))
            ).one()
            unattributed = conn.execute(
                sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(pm.bytes), 0)).where(
                    pm.parked_ms < horizon_start_ms
                )
            ).one()
            reported = conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(pm.bytes), 0)).where(pm.reported_ms.is_not(None))
            ).scalar()
            quarantined = conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(quarantined_measures.c.bytes), 0))
            ).scalar()
            letters = conn.execute(sa.select(sa.func.count()).select_from(dead_letters)).scalar()
            unbilled = conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(unbilled_bytes.c.bytes), 0))
            ).scalar()
            g = stream_gaps.c
            missing = conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(g.last_seq - g.first_seq + 1), 0))
            ).scalar()
            records = conn.execute(sa.select(sa.func.count()).select_from(usage_records)).scalar()
            adjustments = conn.execute(sa.select(sa.func.count()).select_from(usage_adjustments)).scalar()
        return {
            "parked_measures": int(parked[0]),
            "parked_bytes": int(parked[1]),
            "unattributed_measures": int(unattributed[0]),
            "unattributed_bytes": int(unattributed[1]),
            "reported_unattributed_bytes": int(reported or 0),
            "quarantined_bytes": int(quarantined or 0),
            "dead_letters": int(letters or 0),
            "unbilled_bytes": int(unbilled or 0),
            "missing_batches": int(missing or 0),
            "usage_records": int(records or 0),
            "usage_adjustments": int(adjustments or 0),
        }

    def dead_letter_rows(self) -> list[dict[str, Any]]:
        dl = dead_letters.c
        with self.read() as conn:
            query = sa.select(dl.source, dl.origin, dl.raw, dl.reason, dl.message, dl.created_ms).order_by(
                dl.id
            )
            return [dict(row) for row in conn.execute(query).mappings()]

    def parked_rows(self) -> list[Measure]:
        with self.read() as conn:
            query = sa.select(parked_measures.c.measure).order_by(parked_measures.c.id)
            return [measure_from_json(r[0]) for r in conn.execute(query)]

    def quarantined_rows(self) -> list[Measure]:
        with self.read() as conn:
            query = sa.select(quarantined_measures.c.measure).order_by(quarantined_measures.c.id)
            return [measure_from_json(r[0]) for r in conn.execute(query)]


# Column orders of the tuples _upsert_rows writes: the UsageKey's fields first, as UsageKey has them.
_RECORD_COLUMNS = (
    *KEY_COLUMNS, "quantity", "final", "resource_name", "device_type", "created_ms", "updated_ms"
)  # fmt: skip
_UNBILLED_COLUMNS = (*KEY_COLUMNS, "bytes", "updated_ms")
_EVENT_COLUMNS = ("event_id", "resource_uuid", "time_ms", "raw", "normalized", "received_ms")
if UsageKey._fields != KEY_COLUMNS:  # the tuples above rely on it
    raise RuntimeError(f"UsageKey fields {UsageKey._fields} differ from KEY_COLUMNS {KEY_COLUMNS}")


def _slices(items: Sequence[Any], size: int = 500) -> Iterator[Sequence[Any]]:
    """Consecutive parts of at most `size` items: IN lists and multi-row VALUES stay bounded."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _pg_array_type(column_type: Any) -> str:
    for kind, name in ((sa.Boolean, "boolean"), (sa.BigInteger, "bigint"), (sa.Integer, "integer")):
        if isinstance(column_type, kind):
            return name
    if isinstance(column_type, sa.String):
        return "text"
    raise TypeError(f"no PostgreSQL array type for {column_type!r}")


def _key_dict(key: UsageKey) -> dict[str, Any]:
    return {
        "account": key.account,
        "usage_type": key.usage_type,
        "resource": key.resource,
        "offering": key.offering,
        "detail": key.detail,
        "window_start_ms": key.window_start_ms,
        "window_end_ms": key.window_end_ms,
    }


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


def _sqlite_engine(url: str) -> Engine:
    path = url.split("///", 1)[1] if "///" in url else ""
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, connect_args={"timeout": 60})

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's begin event issue BEGIN itself (pysqlite's own is deferred and late).
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")  # offsets are committed after us: a commit must last
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        # Writers take the write lock up front: a read-then-write transaction never hits BUSY.
        write = conn.get_execution_options().get("kvmeter_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine
