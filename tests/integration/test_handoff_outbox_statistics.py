"""The hand-off's claim after a finalization's burst of items, on PostgreSQL: autovacuum reads
the outbox's statistics again only once a tenth of the table changed, so after a quiet spell
(every item sent) the planner took the new pending items for one row, and each claim joined
every pending item with every other: 22 s a claim at 10,000 items in a 110,000-row outbox
(README, benchmark 5e). A write that adds a burst reads the statistics again once it commits."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa
from bench.store_scale_bench import _fill_outbox

from kvmeter.collector import billable
from kvmeter.collector.model import UsageKey
from kvmeter.collector.schema import handoff_outbox
from kvmeter.collector.store import Store
from kvmeter.collector.store import outbox as store_outbox
from tests.collector_support import ACCT_A, HOUR, T0

pytestmark = pytest.mark.pg

PENDING = (
    "EXPLAIN (FORMAT JSON) SELECT id FROM handoff_outbox WHERE sent_ms IS NULL AND topic_sent_ms IS NULL"
)


def _pending_estimate(store: Store) -> int:
    """How many pending rows the planner expects the topic's pick to find."""
    with store.read() as conn:
        plan = conn.execute(sa.text(PENDING)).scalar_one()
    plan = json.loads(plan) if isinstance(plan, str) else plan
    return int(plan[0]["Plan"]["Plan Rows"])


@pytest.mark.parametrize("burst", [2000, 999])
def test_a_burst_of_items_reads_the_outbox_statistics_again(pg_database: str, burst: int) -> None:
    """20,000 items sent and analyzed (autovacuum off: its threshold not reached), then one
    write adds `burst` new items: from 1,000 at once the planner expects a good many (it
    expected about one, and planned the claim's join for one); below, no ANALYZE is run."""
    store = Store(pg_database, outbox=True)
    store.migrate()
    with store.write() as conn:
        conn.execute(sa.text("ALTER TABLE handoff_outbox SET (autovacuum_enabled = false)"))
    _fill_outbox(store, 20_000)
    with store.write() as conn:
        conn.execute(sa.update(handoff_outbox).values(topic_sent_ms=T0, webhook_sent_ms=T0, sent_ms=T0))
    with store.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(sa.text("ANALYZE handoff_outbox"))
    assert _pending_estimate(store) <= 10
    keys = [
        UsageKey(ACCT_A, 4, f"9b1f0000-0000-4000-8000-{n:012d}", "", "public", T0, T0 + HOUR)
        for n in range(burst)
    ]
    items = [billable.record_item(key, 1000, "", T0 + HOUR) for key in keys]
    with store.write() as conn:
        store_outbox.add_items(conn, store, items, T0)
    estimate = _pending_estimate(store)
    store.close()
    if burst >= 1000:  # store_outbox.ANALYZE_AFTER_ITEMS
        # (both columns NULL in a tenth of the rows: taken as independent, about 180 of 2,000)
        assert estimate >= 100, f"the planner expects {estimate} pending items of {burst}"
    else:
        assert estimate <= 10, "a write of a few items analyzed the outbox"
