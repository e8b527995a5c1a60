"""Store schema upgrades at their edges, on both databases: an upgrade in place completes what a
store lacks (events stored before their commit-ordered seq keep their order), and a store newer
than the code is refused, never written."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from kvmeter.collector.billing import tariff_file
from kvmeter.collector.billing.rating import Facts
from kvmeter.collector.model import Record, Settings
from kvmeter.collector.schema import EVENT_SEQ, collector_state, lifecycle_events
from kvmeter.collector.schema_item_costs import item_costs
from kvmeter.collector.service import Collector
from kvmeter.collector.store import MIGRATIONS, Store, schema_version
from tests.collector_support import ACCT_A, HOUR, T0, usage_event
from tests.integration.test_item_costs import TARIFF, items
from tests.integration.test_outbox_store import _run


def test_a_store_whose_migration_19_predates_item_costs_gets_the_table(store_url: str) -> None:
    """Migration 19 first shipped (cdefe68) creating record_versions only; handoff_item_costs was
    added to it later (8b75cd2). A store migrated to 19 by the first form, upgraded in place, must
    get handoff_item_costs: priced billable items are then made as on a fresh store (before the
    fix: `no such table` / `relation does not exist` at the first finalization, the collector
    stalled)."""
    store = Store(store_url)
    store.migrate()
    with store.write() as conn:  # what cdefe68 left: 19 applied, no handoff_item_costs, none after
        conn.execute(sa.text(f"DROP TABLE {item_costs.name}"))
        conn.execute(sa.delete(schema_version).where(schema_version.c.version > 19))
    store.close()
    upgraded = Store(store_url, outbox=True)
    upgraded.migrate()
    assert sa.inspect(upgraded.engine).has_table(item_costs.name)
    tariff = tariff_file.from_dict(TARIFF, "test tariff", billable=["public"])
    upgraded.pricing = lambda _conn: (tariff, Facts())
    _run(upgraded)
    made = items(upgraded)
    assert made
    assert all("cost" in item for item in made)
    upgraded.close()


def test_a_store_newer_than_the_code_is_refused_not_written(store_url: str) -> None:
    """A store migrated by a newer kvmeter (a downgrade, or an old replica left running) is
    refused at start with an error naming both versions, and nothing is written to it; before
    the fix migrate() reported the newer version and the old code went on writing a schema it
    does not know."""
    store = Store(store_url)
    store.migrate()
    newer = max(v for v, _ in MIGRATIONS) + 1
    with store.write() as conn:
        conn.execute(sa.insert(schema_version).values(version=newer, applied_ms=1))
        conn.execute(sa.delete(schema_version).where(schema_version.c.version == 2))  # one pending
    store.close()
    older_code = Store(store_url)
    with pytest.raises(RuntimeError, match=rf"schema version {newer}, newer than"):
        older_code.migrate()
    with older_code.read() as conn:  # the pending migration was not applied either
        versions = set(conn.execute(sa.select(schema_version.c.version)).scalars())
    assert 2 not in versions
    assert newer in versions
    older_code.close()


def test_events_stored_before_migration_24_keep_their_order_and_new_ones_follow(store_url: str) -> None:
    """Migration 24 gives lifecycle events a seq in commit order, what replicas' syncs page by.
    A store written before it: every stored event takes its id as its seq (the order syncs
    read them in until then), the counter starts above them, a replica starting on the
    upgraded store learns them all, and an event stored after the upgrade comes after them."""
    store = Store(store_url)
    store.migrate()
    older = Collector(store, Settings(), lambda: T0 + 3 * HOUR)
    for vm in ("vm-1", "vm-2", "vm-3"):
        older.apply_events([Record(*reversed(usage_event("VM.CREATE", vm, ACCT_A, T0)))])
    with store.write() as conn:  # as a store at migration 23 holds them: no seq, no counter
        conn.execute(sa.text("DROP INDEX ix_lifecycle_events_seq"))
        conn.execute(sa.update(lifecycle_events).values(seq=None))
        conn.execute(sa.delete(collector_state).where(collector_state.c.name == EVENT_SEQ))
        conn.execute(sa.delete(schema_version).where(schema_version.c.version > 23))
    store.close()
    upgraded = Store(store_url)
    upgraded.migrate()
    with upgraded.read() as conn:
        rows = conn.execute(sa.select(lifecycle_events.c.id, lifecycle_events.c.seq)).all()
    assert sorted(seq for _, seq in rows) == sorted(row_id for row_id, _ in rows)
    replica = Collector(upgraded, Settings(), lambda: T0 + 3 * HOUR)
    assert replica.sync() == {"vm-1", "vm-2", "vm-3"}
    replica.apply_events([Record(*reversed(usage_event("VM.CREATE", "vm-4", ACCT_A, T0)))])
    with upgraded.read() as conn:
        after = upgraded.events_since(conn, max(row_id for row_id, _ in rows))
    assert [resource for _, resource, _, _ in after] == ["vm-4"]
    upgraded.close()
