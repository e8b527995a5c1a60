"""Adjustments get their seq in commit order: the last step of a write transaction that made
some, under the row lock of one counter held until the commit.

An id (or a time) is taken when a row is inserted, but transactions of two replicas commit in
any order: a reader paging by id could see 11 committed, move its cursor past it, and never
see 10, committed a moment later. A seq is given only at the end of the transaction, under a
lock the commit releases, so every seq below a committed one is committed already.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from kvmeter.collector.schema import collector_state, usage_adjustments
from kvmeter.collector.schema_outbox import ADJUSTMENT_SEQ

PENDING = "kvmeter_unsequenced"  # Connection.info flag: this transaction wrote adjustments


def mark_pending(conn: Connection) -> None:
    conn.info[PENDING] = True


def assign(conn: Connection) -> int:
    """Give this transaction's adjustments (seq still NULL) the next seqs, in id order; the
    counter's row stays locked until the commit. Returns how many."""
    if not conn.info.pop(PENDING, False):
        return 0
    adj = usage_adjustments.c
    pending = conn.execute(sa.select(adj.id).where(adj.seq.is_(None)).order_by(adj.id))
    ids = [int(row[0]) for row in pending]
    if not ids:
        return 0
    state = collector_state.c
    conn.execute(
        sa.update(collector_state).where(state.name == ADJUSTMENT_SEQ).values(value=state.value + len(ids))
    )
    top = int(conn.execute(sa.select(state.value).where(state.name == ADJUSTMENT_SEQ)).scalar_one())
    first = top - len(ids) + 1
    conn.execute(
        sa.update(usage_adjustments).where(adj.id == sa.bindparam("row_id")).values(seq=sa.bindparam("s")),
        [{"row_id": row_id, "s": first + n} for n, row_id in enumerate(ids)],
    )
    return len(ids)


def clear(conn: Connection) -> None:
    conn.info.pop(PENDING, None)
