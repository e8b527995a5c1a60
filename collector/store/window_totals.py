"""Net usage per account, usage type and window, streamed in key order (`kvmeter rebuild`'s diff,
usage_diff.merge_differences): the database groups and sorts, the caller walks the rows one at a
time (a server-side cursor on PostgreSQL), so memory does not grow with the store.

    window_totals(conn, through_ms=None) -> Iterator[(WindowKey, net quantity)]

Net: records plus their adjustments, as Reads.usage gives them (an adjustment counts with its
record). Windows ending after `through_ms` are left out when it is given; zero totals are not.
Order: account by its code points (COLLATE "C" on PostgreSQL, SQLite's BINARY), then type,
window start and end: the same on both stores and in Python, so two stores of different kinds
merge-walk.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from kvmeter.collector.schema import KEY_COLUMNS, usage_adjustments, usage_records
from kvmeter.collector.usage_diff import WindowKey


def _account_order(conn: Connection, column: Any) -> Any:
    return sa.collate(column, "C" if conn.dialect.name == "postgresql" else "BINARY")


def window_totals(conn: Connection, through_ms: int | None = None) -> Iterator[tuple[WindowKey, int]]:
    rec, adj = usage_records.c, usage_adjustments.c
    has_record = (
        sa.select(sa.literal(1))
        .select_from(usage_records)
        .where(*(rec[c] == adj[c] for c in KEY_COLUMNS))
        .exists()
    )
    parts = []
    for table, amount, only in ((rec, rec.quantity, None), (adj, adj.delta, has_record)):
        part = sa.select(
            table.account, table.usage_type, table.window_start_ms, table.window_end_ms, amount.label("q")
        )
        if only is not None:
            part = part.where(only)
        if through_ms is not None:
            part = part.where(table.window_end_ms <= through_ms)
        parts.append(part)
    u = sa.union_all(*parts).subquery()
    keys = (u.c.account, u.c.usage_type, u.c.window_start_ms, u.c.window_end_ms)
    query = (
        sa.select(*keys, sa.func.sum(u.c.q))
        .group_by(*keys)
        .order_by(_account_order(conn, u.c.account), *keys[1:])
    )
    for row in conn.execution_options(stream_results=True, yield_per=1000).execute(query):
        yield WindowKey(str(row[0]), int(row[1]), int(row[2]), int(row[3])), int(row[4])
