"""Rows that readers page through get their seq in commit order: the last step of a write
transaction that made some, under the row lock of their counter held until the commit.

An id (or a time) is taken when a row is inserted, but transactions of two replicas commit in
any order: a reader paging by id could see 11 committed, move its cursor past it, and never
see 10, committed a moment later. A seq is given only at the end of the transaction, under a
lock the commit releases, so every seq below a committed one is committed already.

Two kinds are sequenced: lifecycle events (every replica's sync pages through them, and an event
only one replica received reaches the others that way) and adjustments (/v1/adjustments). Their
counters are locked in that order, always, so two transactions never wait on each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from kvmeter.collector.schema import EVENT_SEQ, collector_state, lifecycle_events, usage_adjustments
from kvmeter.collector.schema_outbox import ADJUSTMENT_SEQ


@dataclass(frozen=True)
class Sequenced:
    table: sa.Table
    counter: str  # collector_state: the last seq given
    pending: str  # Connection.info flag: this transaction wrote rows of this kind


EVENTS = Sequenced(lifecycle_events, EVENT_SEQ, "kvmeter_unsequenced_events")
ADJUSTMENTS = Sequenced(usage_adjustments, ADJUSTMENT_SEQ, "kvmeter_unsequenced")
_LOCK_ORDER = (EVENTS, ADJUSTMENTS)


def mark_pending(conn: Connection, kind: Sequenced) -> None:
    conn.info[kind.pending] = True


def assign(conn: Connection) -> int:
    """Give this transaction's new rows (seq still NULL, as any an older replica committed) the
    next seqs of their kind, in id order; each counter's row stays locked until the commit.
    Returns how many."""
    return sum(_assign(conn, kind) for kind in _LOCK_ORDER)


def _assign(conn: Connection, kind: Sequenced) -> int:
    if not conn.info.pop(kind.pending, False):
        return 0
    rows, state = kind.table.c, collector_state.c
    # The counter first, then the rows still without a seq: this transaction's and any an older
    # replica committed (a rolling upgrade). Read before the lock, another replica's numbering of
    # those committed meanwhile would be numbered again here, a seq already read taken back.
    counter = sa.select(state.value).where(state.name == kind.counter).with_for_update()
    last = int(conn.execute(counter).scalar_one())
    pending = conn.execute(sa.select(rows.id).where(rows.seq.is_(None)).order_by(rows.id))
    ids = [int(row[0]) for row in pending]
    if not ids:
        return 0
    conn.execute(sa.update(collector_state).where(state.name == kind.counter).values(value=last + len(ids)))
    first = last + 1
    if conn.dialect.name == "postgresql":
        # One statement for any number of rows: an UPDATE per row (a round trip each on
        # psycopg2) held the counter, which every replica's writes of this kind wait on, as long
        conn.execute(_numbered(kind.table), {"ids": ids, "before": first - 1})
        return len(ids)
    conn.execute(
        sa.update(kind.table).where(rows.id == sa.bindparam("row_id")).values(seq=sa.bindparam("s")),
        [{"row_id": row_id, "s": first + n} for n, row_id in enumerate(ids)],
    )
    return len(ids)


def _numbered(table: sa.Table) -> sa.TextClause:
    """PostgreSQL: the rows of ids :ids take seqs :before + 1, :before + 2, ... in that order."""
    return sa.text(
        f"UPDATE {table.name} SET seq = CAST(:before AS bigint) + r.n "
        "FROM unnest(CAST(:ids AS bigint[])) WITH ORDINALITY AS r(id, n) "
        f"WHERE {table.name}.id = r.id"
    )


def number_stragglers(conn: Connection) -> int:
    """Give a seq to lifecycle events committed without one (an older replica's, in a rolling
    upgrade), under the counters' lock order; returns how many. The caller checks cheaply first
    that there are some (ix_lifecycle_events_seq finds `seq IS NULL`)."""
    mark_pending(conn, EVENTS)
    return assign(conn)


def clear(conn: Connection) -> None:
    for kind in _LOCK_ORDER:
        conn.info.pop(kind.pending, None)
