"""The reconciler's corrections a page at a time, for GET /v1/corrections (cursor paging).

Order: (time, the correcting event's row id), so a page from a cursor continues exactly where
the previous one ended, however many corrections share a time. Only applied corrections (their
event is stored) are listed, as list_corrections does.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from kvmeter.collector.schema import corrections, lifecycle_events

Position = tuple[int, int]  # (time_ms, lifecycle_events.id) of a page's last correction


def page_corrections(
    conn: Connection,
    *,
    accounts: frozenset[str] | None,
    resource: str | None,
    start_ms: int,
    end_ms: int,
    limit: int,
    after: Position | None = None,
) -> tuple[list[dict[str, Any]], Position | None]:
    """Up to `limit` corrections in [start_ms, end_ms) after `after`; `accounts` None: all,
    else only theirs. Returns them and the position of the last (None for none)."""
    c, e = corrections.c, lifecycle_events.c
    query = (
        sa.select(corrections, e.id.label("position"))
        .join(lifecycle_events, e.event_id == c.event_id)
        .where(c.time_ms >= start_ms, c.time_ms < end_ms)
        .order_by(c.time_ms, e.id)
        .limit(limit)
    )
    if accounts is not None:
        query = query.where(c.account.in_(sorted(accounts)))
    if resource is not None:
        query = query.where(c.resource == resource)
    if after is not None:
        query = query.where(sa.or_(c.time_ms > after[0], sa.and_(c.time_ms == after[0], e.id > after[1])))
    rows = [dict(row._mapping) for row in conn.execute(query)]
    positions = [(int(row["time_ms"]), int(row.pop("position"))) for row in rows]
    return rows, (positions[-1] if positions else None)
