"""The hand-off's topic pick at outbox depth, on both databases: a claim's topic side reads the
topic's own index (ix_handoff_outbox_topic, migration 29) and stops, whichever of the outbox's
indexes SQLite lists first, instead of walking every pending row when the topic already has them
and the webhook lacks them (a webhook down, or refusing most items: 20-30 ms a claim at 100,000,
README, benchmark 5e); a store upgraded from before migration 29 gets the index, and its claims
offer the same rows."""

from __future__ import annotations

import sqlalchemy as sa

from kvmeter.collector.schema import handoff_outbox
from kvmeter.collector.store import Store, schema_version
from kvmeter.collector.store import outbox as store_outbox
from tests.collector_support import T0
from tests.handoff_support import pick_plans
from tests.integration.test_handoff_edges import outbox
from tests.integration.test_handoff_refusals import key, store_of

PENDING_INDEX = "CREATE INDEX ix_handoff_outbox_pending ON handoff_outbox (sent_ms, id)"
TOPIC_INDEX = (
    "CREATE INDEX ix_handoff_outbox_topic ON handoff_outbox (topic_sent_ms, id) "
    "WHERE sent_ms IS NULL AND topic_sent_ms IS NULL"
)


def _topic_plan(store: Store) -> str:
    """The query plan of the topic's pick (one query)."""
    [plan] = pick_plans(store, store_outbox.TOPIC, 200, T0 + 10**6)
    return "\n".join(plan)


def _recreate(store: Store, name: str, ddl: str) -> None:
    """Drop and create an index again: SQLite lists it after the others (its schema's order,
    which SQLAlchemy's set of a table's indexes leaves to chance, breaks a tie of two plans)."""
    with store.write() as conn:
        conn.execute(sa.text(f"DROP INDEX {name}"))
        conn.execute(sa.text(ddl))


def test_the_topics_pick_walks_its_own_index(store_url: str) -> None:
    """An outbox of 3,000 pending items, the topic having 9 in 10 and the webhook none: the
    topic's pick reads ix_handoff_outbox_topic (SQLite: in its order, no sort), whichever of it
    and the pending index SQLite lists first. Without it the pick walked every pending row (those
    the topic has too) to find the few it lacks."""
    store = Store(store_url, outbox=True)
    store.migrate()
    rows = [
        {
            "transaction_id": f"tid-{n:06d}",
            "account": f"acct-{n % 50:03d}",
            "item": "{}",
            "created_ms": T0,
            "topic_sent_ms": T0 if n % 10 else None,
            "record": f"rec-{n:06d}",
            "version": 0,
        }
        for n in range(3000)
    ]
    with store.write() as conn:
        conn.execute(sa.insert(handoff_outbox), rows)
    try:
        if store.is_postgres:
            with store.engine.connect() as conn:
                analyze = sa.text("ANALYZE handoff_outbox")
                conn.execution_options(isolation_level="AUTOCOMMIT").execute(analyze)
            plans = [_topic_plan(store)]
        else:
            _recreate(store, "ix_handoff_outbox_pending", PENDING_INDEX)
            plans = [_topic_plan(store)]
            _recreate(store, "ix_handoff_outbox_topic", TOPIC_INDEX)
            plans.append(_topic_plan(store))
    finally:
        store.close()
    for plan in plans:
        assert "ix_handoff_outbox_topic" in plan, f"the topic's pick not on its index:\n{plan}"
        assert "TEMP B-TREE" not in plan, f"the topic's pick sorts:\n{plan}"


def test_a_store_from_before_migration_29_gets_the_topics_index_and_the_same_claims(
    store_url: str,
) -> None:
    """A store migrated before migration 29 (no topic index) with three pending items, the topic
    having the second: upgraded, it has the topic's index, and claims offer what they
    did: the topic the first and third, the webhook all three, in id order; the next claim
    (their lease still running) nothing."""
    store = store_of(store_url, [key(0), key(1), key(2)])
    ids = [r["id"] for r in outbox(store)]
    with store.write() as conn:  # what a store before migration 29 has
        conn.execute(sa.text("DROP INDEX ix_handoff_outbox_topic"))
        conn.execute(sa.delete(schema_version).where(schema_version.c.version >= 29))
        conn.execute(sa.update(handoff_outbox).where(handoff_outbox.c.id == ids[1]).values(topic_sent_ms=T0))
    store.close()
    upgraded = Store(store_url, outbox=True)
    try:
        upgraded.migrate()
        with upgraded.read() as conn:
            names = {i["name"] for i in sa.inspect(conn).get_indexes("handoff_outbox")}
        assert "ix_handoff_outbox_topic" in names
        claimed = upgraded.claim_outbox(10, T0 + 1, 1000, ["topic", "webhook"])
        assert [(r.id, sorted(r.offered)) for r in claimed] == [
            (ids[0], ["topic", "webhook"]),
            (ids[1], ["webhook"]),
            (ids[2], ["topic", "webhook"]),
        ]
        assert upgraded.claim_outbox(10, T0 + 2, 1000, ["topic", "webhook"]) == []
    finally:
        upgraded.close()
