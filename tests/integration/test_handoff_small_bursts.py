"""The hand-off's claim on PostgreSQL for a burst of fewer than 1,000 items (not analyzed after
its write, store/outbox.py ANALYZE_AFTER_ITEMS): the statistics, read while every item was sent,
take the burst's items for one row. Each candidate's check for an earlier pending version of its
record (store/outbox.py _pick's EXISTS) must still look up that record's versions, not read every
pending item (999 items in an outbox of 1,000,000: 0.4-0.6 s a claim, about 1 s a burst)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import sqlalchemy as sa

from kvmeter.collector import billable
from kvmeter.collector.model import UsageKey
from kvmeter.collector.store import Store
from kvmeter.collector.store import outbox as store_outbox
from tests.collector_support import ACCT_A, HOUR, T0

pytestmark = pytest.mark.pg

SINKS = (store_outbox.TOPIC, store_outbox.WEBHOOK)
NOW = T0 + 2 * HOUR
LIMIT = 200  # a claim's batch (the [handoff] default)


def _sent_history(store: Store, rows: int) -> None:
    """`rows` items every sink confirmed (200 at a time), then the statistics read (as autovacuum
    leaves them after a quiet spell: no item pending)."""
    with store.write() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO handoff_outbox (transaction_id, account, item, created_ms, topic_sent_ms,"
                " webhook_sent_ms, sent_ms, attempts, record, version) SELECT 'sent-' || g, 'acct',"
                " '{}', :t, :t + g / 200, :t + g / 200, :t + g / 200, 1, md5(g::text)::uuid::text, 0"
                " FROM generate_series(1, :n) AS g"
            ),
            {"t": T0, "n": rows},
        )
    with store.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(sa.text("ANALYZE handoff_outbox"))


def _reads(store: Store, sink: str) -> list[dict[str, tuple[int, int]]]:
    """Per query of the pick for `sink` (store/outbox.py _pick, as a claim runs it, executed by
    EXPLAIN ANALYZE; its locks let go): for each table read, the candidates' ("handoff_outbox")
    and the EXISTS's ("earlier"), (rows read per loop, counting those its filter removed, loops)."""
    captured: list[Any] = []
    reads = []
    with store.read() as conn:

        class Spy:
            dialect = conn.dialect

            def execute(self, query: Any) -> list[Any]:
                captured.append(query)
                return []

        store_outbox._pick(Spy(), sink, LIMIT, NOW)  # type: ignore[arg-type]
        for query in captured:
            sql = str(query.compile(conn, compile_kwargs={"literal_binds": True}))
            plan = conn.execute(sa.text("EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON) " + sql)).scalar_one()
            plan = json.loads(plan) if isinstance(plan, str) else plan
            found, nodes = {}, [plan[0]["Plan"]]
            while nodes:
                node = nodes.pop()
                nodes += node.get("Plans", [])
                if node.get("Alias") and node.get("Actual Loops", 0):
                    read = int(node["Actual Rows"]) + int(node.get("Rows Removed by Filter", 0))
                    found[node["Alias"]] = (read, int(node["Actual Loops"]))
            reads.append(found)
    return reads


def _burst(store: Store, records: int, second_versions: int) -> None:
    """One write (as a finalization and its adjustments make) of `records` records' items and a
    second version of the first `second_versions` of them."""
    keys = [
        UsageKey(ACCT_A, 4, f"9b1f0000-0000-4000-8000-{n:012d}", "", "public", T0, T0 + HOUR)
        for n in range(records)
    ]
    items = [billable.record_item(key, 1000, "", NOW) for key in keys]
    items += [billable.adjustment_item(key, 1, 5, "late bytes", NOW) for key in keys[:second_versions]]
    with store.write() as conn:
        store_outbox.add_items(conn, store, items, NOW)


def test_a_burst_under_the_analyze_threshold_is_claimed_by_record(pg_database: str) -> None:
    """20,000 items sent and analyzed, then one write adds 400 items (not analyzed: under 1,000),
    10 of them a record's second version whose first is pending too. For each candidate, both
    sinks' picks read only its record's earlier versions (at most one here), not every pending
    item (the plan made for one pending row read all 400 for each); the claim still holds each
    second version back while its first is pending."""
    store = Store(pg_database, outbox=True)
    store.migrate()
    _sent_history(store, 20_000)
    _burst(store, 390, 10)
    try:
        for sink in SINKS:
            earlier = [r["earlier"] for r in _reads(store, sink) if "earlier" in r]
            assert earlier, f"the {sink}'s pick has no EXISTS"
            assert all(rows <= 1 for rows, _ in earlier), f"{sink}: (rows a lookup, lookups) {earlier}"
        claimed = store.claim_outbox(500, NOW, 60_000, SINKS)
    finally:
        store.close()
    versions = [json.loads(row.item)["version"] for row in claimed]
    assert sorted(versions) == [0] * 390, "a second version offered before its first was sent"


def test_an_analyzed_burst_is_claimed_by_walking_the_topics_index(pg_database: str) -> None:
    """20,000 items sent and analyzed, then one write adds 1,000 items (analyzed after it:
    ANALYZE_AFTER_ITEMS). The topic's pick reads the 200 it takes from its own index and stops,
    as its comment says: not every pending item (a hash of all of them, then a sort: 15 ms a pick
    at 10,000 items), nor the primary key from the first sent item on (20,000 rows to find 200)."""
    store = Store(pg_database, outbox=True)
    store.migrate()
    _sent_history(store, 20_000)
    _burst(store, 1000, 0)
    try:
        reads = _reads(store, store_outbox.TOPIC)
    finally:
        store.close()
    rows, loops = reads[0]["handoff_outbox"]
    assert rows * loops <= LIMIT + 1, f"(rows read, loops) {(rows, loops)}"
