"""Bounded memory's statements (schema_residency): what finds a resource out of memory again.

save_evicted_keys(conn, rows)            # (key, resource, last end) of resources leaving memory
evicted_holders(conn, keys) -> rows      # (key, resource, last end) of those keys
first_event_rows(conn, uuids) -> dict    # {uuid: its first stored event's seq}
delete_evicted_keys(conn, resources)     # with the resources' pruned events
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from kvmeter.collector.schema import lifecycle_events
from kvmeter.collector.schema_residency import evicted_keys
from kvmeter.collector.store.engine import slices


def _insert(conn: Connection) -> Any:
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(evicted_keys)


def save_evicted_keys(conn: Connection, rows: Iterable[tuple[str, str, int]]) -> None:
    """Upsert (key, resource, last end): a resource leaving again keeps the later end."""
    values = [{"key": k[:128], "resource": r[:128], "last_end_ms": end} for k, r, end in sorted(set(rows))]
    if not values:
        return
    stmt = _insert(conn)
    stmt = stmt.on_conflict_do_update(
        index_elements=["key", "resource"],
        set_={"last_end_ms": sa.func.max(evicted_keys.c.last_end_ms, stmt.excluded.last_end_ms)}
        if conn.dialect.name == "sqlite"
        else {"last_end_ms": sa.func.greatest(evicted_keys.c.last_end_ms, stmt.excluded.last_end_ms)},
    )
    for part in slices(values):
        conn.execute(stmt, list(part))


def evicted_holders(conn: Connection, keys: Iterable[str]) -> list[tuple[str, str, int]]:
    k = evicted_keys.c
    out: list[tuple[str, str, int]] = []
    for part in slices(sorted({key for key in keys if key})):
        query = sa.select(k.key, k.resource, k.last_end_ms).where(k.key.in_(part))
        out.extend((str(r[0]), str(r[1]), int(r[2])) for r in conn.execute(query))
    return out


def first_event_rows(conn: Connection, uuids: Iterable[str]) -> dict[str, int]:
    """{uuid: seq of its first stored event} of the uuids with stored events."""
    ev = lifecycle_events.c
    out: dict[str, int] = {}
    for part in slices(sorted({u for u in uuids if u})):
        query = sa.select(ev.resource_uuid, sa.func.min(ev.seq)).where(ev.resource_uuid.in_(part))
        # 0 for events all without a seq yet (an older replica's, in a rolling upgrade): stored
        out.update({str(r[0]): int(r[1] or 0) for r in conn.execute(query.group_by(ev.resource_uuid))})
    return out


def delete_evicted_keys(conn: Connection, resources: Iterable[str]) -> None:
    for part in slices(sorted(set(resources))):
        conn.execute(sa.delete(evicted_keys).where(evicted_keys.c.resource.in_(part)))
