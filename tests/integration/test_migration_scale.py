"""Migration 24 on a PostgreSQL store of many lifecycle events: every event still takes its id
as its seq, in one rewrite of the table rather than an UPDATE of every row (which held the
table locked three times as long and left a dead copy of every row behind)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from kvmeter.collector.model import Record, Settings
from kvmeter.collector.schema import EVENT_SEQ, collector_state, lifecycle_events
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store, schema_version
from tests.collector_support import ACCT_A, HOUR, T0, usage_event

EVENTS = 20_000


@pytest.mark.pg
def test_migration_24_rewrites_a_big_event_table_once_keeping_the_id_order(pg_database: str) -> None:
    """A store at migration 23 holding 20,000 lifecycle events (copies of a real stored one),
    upgraded in place: every event's seq is its id, the counter starts above them, and the
    table's heap stays about its size (a rewrite; the UPDATE of every row doubled it, and on
    1M events held the table, which every replica's event writes wait on, 34 s instead of 11)."""
    store = Store(pg_database)
    store.migrate()
    Collector(store, Settings(), lambda: T0 + HOUR).apply_events(
        [Record(*reversed(usage_event("VM.CREATE", "vm-seed", ACCT_A, T0)))]
    )
    with store.write() as conn:  # as a store at migration 23 holds them: no seq column, no counter
        conn.execute(sa.text("DROP INDEX ix_lifecycle_events_seq"))
        conn.execute(sa.text("ALTER TABLE lifecycle_events DROP COLUMN seq"))
        conn.execute(sa.delete(schema_version).where(schema_version.c.version == 24))
        conn.execute(sa.delete(collector_state).where(collector_state.c.name == EVENT_SEQ))
        conn.execute(
            sa.text(
                "INSERT INTO lifecycle_events (event_id, resource_uuid, time_ms, raw, normalized, "
                "received_ms) SELECT 'copy-' || g, 'vm-' || g, time_ms + g, raw, normalized, received_ms "
                "FROM lifecycle_events, generate_series(1, :n) AS g"
            ),
            {"n": EVENTS - 1},
        )
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
