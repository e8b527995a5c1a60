"""Retention on both stores with the clock moved forward a month: what a non-final window, an
unattributed report or a rebuild still needs stays; what is past its age goes, in bounded
transactions; a dry run counts exactly what a pass deletes; usage stays as billed."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from confluent_kafka import Producer

from kvmeter.collector.metrics import Metrics
from kvmeter.collector.model import Record
from kvmeter.collector.prune import PRUNE_LOCK, Busy, PruneJob, Pruner
from kvmeter.collector.rebuild import rebuild
from kvmeter.collector.reconcile import Witness
from kvmeter.collector.retention import DAY_MS
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store, lifecycle_events, reconciliation
from tests.collector_support import (
    ACCT_A,
    ACCT_B,
    HOUR,
    IP1,
    MIN,
    T0,
    VM2,
    Clock,
    M,
    Stream,
    usage_event,
)
from tests.integration.test_consume_live import kafka_config, produce
from tests.retention_support import (
    NOW,
    POLICY,
    SETTINGS,
    VM5,
    VM6,
    add_outbox,
    correct_a_pruned_and_a_kept_event,
    event_resources,
    feed,
    month,
    outbox_ids,
    row_counts,
)


@pytest.fixture
def fed(store: Store) -> tuple[Store, Collector, Clock]:
    clock = Clock(T0)
    collector = feed(store, clock, month())
    add_outbox(store)
    return store, collector, clock


def test_a_month_on_nothing_still_needed_is_pruned_and_usage_stays_as_billed(
    fed: tuple[Store, Collector, Clock],
) -> None:
    store, collector, clock = fed
    correct_a_pruned_and_a_kept_event(store)
    with store.write() as conn:  # the reconciler's witnesses: a domain gone, one up
        reconciliation.save_witness(conn, {"gone": Witness(False, T0), "up": Witness(True, T0)})
    billed = store.net_usage()
    before = row_counts(store)

    counts = Pruner(store, POLICY, clock).run()

    # Closed, final, old histories went (VM1, IP1); VM2 is open, VM6's last window is not final,
    # VM5's uuid is carried by a measure still parked (unreported): they stay.
    assert event_resources(store) == {VM2, VM5, VM6}
    assert (
        counts["lifecycle_events"] == 6 == before["lifecycle_events"] - row_counts(store)["lifecycle_events"]
    )
    # VM3's measure, reported as unattributed 28 days ago, went; VM5's and VM7's wait within the horizon.
    assert sorted(m.instance_uuid for m in store.parked_rows()) == sorted(
        [VM5, "9b1f0000-0000-4000-8000-000000000vm7"]
    )
    assert store.quarantined_rows() == []
    assert len(store.dead_letter_rows()) == 1  # open: kept for good by this policy
    assert store.marks() == {"stream-h3": 1, "stream-h4": 1}  # h1 (and its gap), h2: retired
    assert counts["stream_gaps"] == 1
    assert row_counts(store)["stream_gaps"] == 0
    with store.read() as conn:
        assert [c["resource"] for c in reconciliation.list_corrections(conn)] == [VM2]
        assert {r[0] for r in conn.execute(sa.text("SELECT resource FROM corrections"))} == {VM2}
        assert set(reconciliation.load_witness(conn)) == {"up"}
    assert counts["corrections"] == 1
    assert counts["domain_witness"] == 1
    assert store.net_usage() == billed  # usage is kept for good by default
    assert outbox_ids(store) == {"tx-new-sent", "tx-pending"}  # pending: however old, it stays
    assert counts["handoff_outbox"] == 1

    # Time goes on: ticks, and the old events delivered again (a consumer group reset) change
    # nothing billed; a pruned resource's new life bills from now on only.
    collector.tick()
    month_events = month()[0].events
    again = collector.apply_events([Record(v, k) for k, v in month_events[:6]])
    assert again.events == 0
    assert again.known_events == 6
    assert store.net_usage() == billed
    assert event_resources(store) == {VM2, VM5, VM6}
    clock.now = NOW + 3 * HOUR
    collector.apply_events([Record(v, k) for k, v in [usage_event("NET.IPASSIGN", IP1, ACCT_B, NOW + HOUR)]])
    collector.tick()
    after = store.net_usage()
    assert {k: v for k, v in after.items() if k.window_start_ms < NOW} == {
        k: v for k, v in billed.items() if k.window_start_ms < NOW
    }
    assert {
        (k.account, k.window_start_ms) for k in after if k.resource == IP1 and k.window_start_ms >= NOW
    } == {
        (ACCT_B, NOW + HOUR),
        (ACCT_B, NOW + 2 * HOUR),
    }


def test_after_pruning_a_replay_gives_the_same_records_and_what_remains_rebuilds_its_resources(
    fed: tuple[Store, Collector, Clock], tmp_path: Path
) -> None:
    store, _, clock = fed
    Pruner(store, POLICY, clock).run()
    # The topics replayed into an empty store: the same final (and open) records as the pruned store.
    replayed = Store(f"sqlite:///{tmp_path}/replay.db")
    replayed.migrate()
    feed(replayed, Clock(T0), month())
    assert replayed.net_usage() == store.net_usage()
    # A rebuild from the raw events left: the records of every resource whose events remain.
    rebuilt = Store(f"sqlite:///{tmp_path}/rebuilt.db")
    rebuilt.migrate()
    with store.read() as conn:
        raw = [(bytes(r[0]), None if r[1] is None else bytes(r[1])) for r in conn.execute(
            sa.select(lifecycle_events.c.raw, lifecycle_events.c.record_key).order_by(lifecycle_events.c.id)
        )]  # fmt: skip
    Collector(rebuilt, SETTINGS, clock).apply_events([Record(v, k) for v, k in raw])
    kept = {VM2, VM5, VM6}
    time_records = {
        k: v for k, v in store.net_usage().items() if k.resource in kept and k.usage_type in (1, 2, 3)
    }
    assert time_records
    assert rebuilt.net_usage() == time_records
    replayed.close()
    rebuilt.close()


def test_a_dry_run_deletes_nothing_and_counts_what_a_pass_deletes(
    fed: tuple[Store, Collector, Clock],
) -> None:
    store, _, clock = fed
    policy = dataclasses.replace(POLICY, dead_letters_open_ms=DAY_MS, usage_ms=7 * DAY_MS)
    before = row_counts(store)
    dry = Pruner(store, policy, clock).run(dry_run=True)
    assert row_counts(store) == before
    assert dry["lifecycle_events"] == 6
    assert dry["usage_records"] > 0
    assert dry["dead_letters_open"] == 1
    real = Pruner(store, policy, clock).run()
    assert real == dry
    after = row_counts(store)
    deleted = {table: before[table] - after[table] for table in before}
    assert deleted["dead_letters"] == real["dead_letters_open"] + real["dead_letters_resolved"]
    for table in set(deleted) - {"dead_letters"}:
        assert deleted[table] == real.get(table, 0), table
    assert Pruner(store, policy, clock).run(dry_run=True) == dict.fromkeys(real, 0)


def test_pruned_usage_is_never_recomputed_back(fed: tuple[Store, Collector, Clock]) -> None:
    store, collector, clock = fed
    policy = dataclasses.replace(POLICY, usage_ms=7 * DAY_MS)
    counts = Pruner(store, policy, clock).run()
    assert counts["usage_records"] > 0
    assert counts["usage_adjustments"] == 1
    through = NOW - 7 * DAY_MS
    assert all(k.window_end_ms > through for k in store.net_usage())
    kept = store.net_usage()
    # VM2 (open since T0, its events kept) stops: its whole history is recomputed; the windows
    # pruned stay pruned (no record, no adjustment), the rest is as the history now says.
    collector.apply_events([Record(v, k) for k, v in [usage_event("VM.STOP", VM2, ACCT_B, NOW - 90 * MIN)]])
    collector.tick()
    after = store.net_usage()
    assert all(k.window_end_ms > through for k in after)
    assert all(k.window_end_ms > through for k in store.adjustments(0, 2**62))
    running = {k.window_start_ms: v for k, v in after.items() if k.resource == VM2 and k.usage_type == 1}
    assert running[NOW - 3 * HOUR] == HOUR
    assert running[NOW - 2 * HOUR] == 30 * MIN
    assert NOW - HOUR not in running
    assert {k: v for k, v in after.items() if k.resource != VM2} == {
        k: v for k, v in kept.items() if k.resource != VM2
    }


class DeleteCounter:
    """Rows deleted per table in each committed transaction."""

    def __init__(self, store: Store):
        self.store = store
        self.current: dict[str, int] = {}
        self.committed: list[dict[str, int]] = []
        sa.event.listen(store.engine, "after_cursor_execute", self._executed)
        sa.event.listen(store.engine, "commit", self._commit)

    def _executed(self, _conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        words = statement.split()
        if words[:2] == ["DELETE", "FROM"] and cursor.rowcount > 0:
            table = words[2].strip('"')
            self.current[table] = self.current.get(table, 0) + cursor.rowcount

    def _commit(self, _conn: Any) -> None:
        if self.current:
            self.committed.append(self.current)
        self.current = {}

    def close(self) -> None:
        sa.event.remove(self.store.engine, "after_cursor_execute", self._executed)
        sa.event.remove(self.store.engine, "commit", self._commit)


def test_big_deletes_go_in_bounded_transactions(store: Store) -> None:
    clock = Clock(T0 + 3 * HOUR)
    collector = Collector(store, SETTINGS, clock)
    vms = [f"9b1f0000-0000-4000-8000-0000000{i:05d}" for i in range(12)]
    events = [
        e
        for vm in vms
        for e in (usage_event("VM.CREATE", vm, ACCT_A, T0), usage_event("VM.DESTROY", vm, ACCT_A, T0 + HOUR))
    ]
    collector.apply_events([Record(v, k) for k, v in events])
    stream = Stream("stream-q", "hq")
    collector.apply_batches(
        [Record(stream.batch([M(T0, T0 + MIN, 10 + i, quarantined=True)])) for i in range(23)]
    )
    clock.now = NOW
    collector.tick()
    policy = dataclasses.replace(POLICY, batch_rows=5)
    deletes = DeleteCounter(store)
    try:
        counts = Pruner(store, policy, clock).run()
    finally:
        deletes.close()
    assert counts["lifecycle_events"] == 24
    assert counts["quarantined_measures"] == 23
    assert all(n <= 5 for tx in deletes.committed for n in tx.values()), deletes.committed
    by_table: dict[str, list[int]] = {}
    for tx in deletes.committed:
        for table, n in tx.items():
            by_table.setdefault(table, []).append(n)
    assert by_table["quarantined_measures"] == [5, 5, 5, 5, 3]
    assert by_table["lifecycle_events"] == [4] * 6  # two resources (4 events) a page: never half of one
    assert event_resources(store) == set()


@pytest.mark.pg
def test_one_pass_at_a_time_on_postgresql(pg_database: str) -> None:
    store = Store(pg_database)
    store.migrate()
    clock = Clock(T0)
    feed(store, clock, month())
    pruner = Pruner(store, POLICY, clock)
    job = PruneJob(pruner, 3600, metrics := Metrics())
    with store.engine.connect() as other, other.begin():  # another replica's pass
        assert other.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": PRUNE_LOCK}).scalar()
        with pytest.raises(Busy):
            pruner.run()
        assert job.run_once() == {}
        assert row_counts(store)["quarantined_measures"] == 1
        other.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": PRUNE_LOCK})
    counts = job.run_once()
    assert counts["quarantined_measures"] == 1
    assert metrics.registry.get_sample_value("kvmeter_pruned_rows_total", {"kind": "lifecycle_events"}) == 6
    store.close()


@pytest.mark.broker
def test_a_rebuild_after_pruning_gives_the_same_final_records(
    fed: tuple[Store, Collector, Clock],
    kafka_bootstrap: str,
    unique_topic: Callable[..., str],
    tmp_path: Path,
) -> None:
    """The topics carried everything the live store was fed; pruning took raw events, held-back
    input and marks from the store: `kvmeter rebuild`'s replay of topics and the stored events
    left gives the live store's records, to the key and quantity."""
    store, _, clock = fed
    measures, lifecycle = unique_topic("measures"), unique_topic("cloudstack")
    steps = month()
    produce(kafka_bootstrap, lifecycle, [e for step in steps for e in step.events])
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    for step in steps:  # at the broker times the live store saw them (the rebuild parks by them)
        for batch in step.batches:
            producer.produce(measures, value=batch, key=b"h", timestamp=step.at_ms)
    assert producer.flush(30) == 0
    counts = Pruner(store, POLICY, clock).run()
    assert counts["lifecycle_events"] == 6
    into = Store(f"sqlite:///{tmp_path}/rebuilt.db")
    into.migrate()
    kafka = kafka_config(kafka_bootstrap, measures, lifecycle, f"rebuild-{measures}")
    done = rebuild(SETTINGS, kafka, store, into, clock)
    assert done.lifecycle_records == sum(len(step.events) for step in steps)
    assert done.stored_events == row_counts(store)["lifecycle_events"]
    assert into.net_usage() == store.net_usage()
    into.close()
