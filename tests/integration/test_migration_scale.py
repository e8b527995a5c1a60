"""Migration 24 on a PostgreSQL store of many lifecycle events: every event still takes its id
as its seq, in one rewrite of the table rather than an UPDATE of every row (which held the
table locked three times as long and left a dead copy of every row behind)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from bench.store_scale_bench import store_before_24

from kvmeter.collector.schema import EVENT_SEQ, collector_state, lifecycle_events
from kvmeter.collector.store import Store

EVENTS = 20_000


@pytest.mark.pg
def test_migration_24_rewrites_a_big_event_table_once_keeping_the_id_order(pg_database: str) -> None:
    """A store at migration 23 holding 20,000 lifecycle events (copies of a real stored one),
    upgraded in place: every event's seq is its id, the counter starts above them, and the
    table's heap stays about its size (a rewrite; the UPDATE of every row doubled it, and on
    1M events held the table, which every replica's event writes wait on, 34 s instead of 11)."""
    store = store_before_24(pg_database, EVENTS)
    heap = "SELECT pg_relation_size('lifecycle_events')"
    with store.read() as conn:
        before = int(conn.execute(sa.text(heap)).scalar_one())
    store.close()
    upgraded = Store(pg_database)
    upgraded.migrate()
    ev = lifecycle_events.c
    with upgraded.read() as conn:
        after = int(conn.execute(sa.text(heap)).scalar_one())
        rows = conn.execute(sa.select(ev.id, ev.seq).order_by(ev.id)).all()
        counter = conn.execute(
            sa.select(collector_state.c.value).where(collector_state.c.name == EVENT_SEQ)
        ).scalar_one()
    upgraded.close()
    assert len(rows) == EVENTS
    assert all(seq == row_id for row_id, seq in rows)
    assert counter == rows[-1][0]
    assert after < 1.3 * before, f"heap {before} -> {after} bytes: every row written twice"
