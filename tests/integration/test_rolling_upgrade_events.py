"""Lifecycle events an older replica stores without a seq during a rolling upgrade (code before
migration 24): every upgraded replica numbers them within a bounded time, without waiting for a
new event, and two replicas numbering them at once give each its seq once, in commit order."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from kvmeter.collector.model import Record, Settings
from kvmeter.collector.schema import EVENT_SEQ, collector_state, lifecycle_events
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store
from tests.collector_support import ACCT_A, HOUR, T0, usage_event

NOW = T0 + 3 * HOUR
_COLUMNS = ("event_id", "resource_uuid", "time_ms", "raw", "normalized", "record_key", "received_ms")


def _older_replica_stores(store: Store, vm: str, tmp_path: Path) -> None:
    """Store VM.CREATE of `vm` as a replica running code before migration 24 does: the same
    row, no seq (the column is unknown to it), the counter untouched."""
    scratch = Store(f"sqlite:///{tmp_path}/older-{vm}.db")
    scratch.migrate()
    Collector(scratch, Settings(), lambda: NOW).apply_events(
        [Record(*reversed(usage_event("VM.CREATE", vm, ACCT_A, T0)))]
    )
    ev = lifecycle_events.c
    with scratch.read() as conn:
        row = conn.execute(sa.select(*(ev[c] for c in _COLUMNS))).one()
    scratch.close()
    with store.engine.connect() as conn, conn.begin():
        conn.execute(sa.insert(lifecycle_events).values(dict(zip(_COLUMNS, row, strict=True))))


def _seqs(store: Store) -> tuple[dict[str, int | None], int]:
    """({resource: seq}, the events' counter)."""
    ev, st = lifecycle_events.c, collector_state.c
    with store.read() as conn:
        seqs = {str(r[0]): r[1] for r in conn.execute(sa.select(ev.resource_uuid, ev.seq))}
        counter = int(conn.execute(sa.select(st.value).where(st.name == EVENT_SEQ)).scalar_one())
    return seqs, counter


@pytest.fixture
def replica(store_url: str) -> Iterator[Collector]:
    store = Store(store_url)
    store.migrate()
    store.straggler_check_s = 0.2  # the default (2 s) is too slow for a test
    collector = Collector(store, Settings(), lambda: NOW)
    collector.apply_events([Record(*reversed(usage_event("VM.CREATE", "vm-1", ACCT_A, T0)))])
    yield collector
    store.close()


def test_an_older_replicas_event_reaches_an_upgraded_replica_without_a_new_event(
    replica: Collector, tmp_path: Path
) -> None:
    """An older replica (no seq code) commits vm-2's VM.CREATE with seq NULL while an upgraded
    replica runs and no other event comes: the upgraded replica's syncs (every chunk and tick)
    number it and learn it within a bounded time (before the fix: never, until some upgraded
    replica stored another event; vm-2 was billed by no replica that had not received it).
    Its seq follows the ones given before it, and an event stored later follows it."""
    _older_replica_stores(replica.store, "vm-2", tmp_path)
    deadline = time.monotonic() + 1.5
    while "vm-2" not in replica.histories and time.monotonic() < deadline:
        replica.sync()
        time.sleep(0.05)
    assert "vm-2" in replica.histories, "the older replica's event was never learned"
    replica.apply_events([Record(*reversed(usage_event("VM.CREATE", "vm-3", ACCT_A, T0)))])
    seqs, counter = _seqs(replica.store)
    assert seqs == {"vm-1": 1, "vm-2": 2, "vm-3": 3}
    assert counter == 3


@pytest.mark.pg
def test_two_replicas_numbering_an_older_replicas_event_at_once_give_it_one_seq(
    pg_database: str, tmp_path: Path
) -> None:
    """Two upgraded replicas find the same event without a seq and number it at once, while a
    third holds the events' counter (its own commit): the one that gets the counter second
    finds it numbered and leaves it. Before the fix each read the rows to number before taking
    the counter, and the second gave the event another seq after the first had committed one
    (the seq a reader had paged past taken back, the counter run past the highest seq)."""
    stores = [Store(pg_database) for _ in range(3)]
    try:
        stores[0].migrate()
        Collector(stores[0], Settings(), lambda: NOW).apply_events(
            [Record(*reversed(usage_event("VM.CREATE", "vm-1", ACCT_A, T0)))]
        )
        _older_replica_stores(stores[0], "vm-2", tmp_path)
        for store in stores[1:]:
            store.straggler_check_s = 0.0
        racers = [threading.Thread(target=store.number_stragglers) for store in stores[1:]]
        st = collector_state.c
        with stores[0].write() as conn:  # a third replica, just before its commit
            conn.execute(sa.select(st.value).where(st.name == EVENT_SEQ).with_for_update())
            for racer in racers:
                racer.start()
            waiting = (
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
            deadline = time.monotonic() + 3
            with stores[0].engine.connect() as watch:
                while time.monotonic() < deadline and watch.execute(sa.text(waiting)).scalar() < 2:
                    watch.rollback()  # a fresh snapshot of pg_stat_activity each time
                    time.sleep(0.02)
        for racer in racers:
            racer.join(10)
        assert _seqs(stores[0]) == ({"vm-1": 1, "vm-2": 2}, 2)
    finally:
        for store in stores:
            store.close()
