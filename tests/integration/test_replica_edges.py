"""Several collector replicas on one store: a replica whose clock runs ahead finalizes no window
still in its grace (PostgreSQL's clock is the one they share), a slower replica's older balance
evaluation never re-arms a crossing another replica raised, and an event one replica commits
after another's later insert still reaches every replica's sync."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa

from kvmeter.collector import cloudstack, lifecycle
from kvmeter.collector.balance_watch import BalanceBook
from kvmeter.collector.balances import Balance, Crossing, Thresholds
from kvmeter.collector.model import Record, Settings, UsageKey
from kvmeter.collector.schema import lifecycle_events, usage_adjustments, usage_records
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store
from kvmeter.collector.store import credits as stored
from kvmeter.collector.windows import window_start
from tests.billing_support import ACCT_A as PAYER
from tests.billing_support import Cloud, tariff
from tests.collector_support import ACCT_A, ACCT_B, HOUR, T0, VM1, usage_event

_OPEN: list[Store] = []


@pytest.fixture(autouse=True)
def _closed() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


def opened(url: str) -> Store:
    store = Store(url, outbox=True)
    store.migrate()
    _OPEN.append(store)
    return store


def test_a_replica_whose_clock_runs_ahead_finalizes_no_window_still_in_its_grace(pg_database: str) -> None:
    """Replicas share one finalization watermark, raised by whichever ticks. A replica whose
    clock runs hours ahead (NTP lost) must not make final, and hand off as version 0, the
    windows still in their grace period or the hour under way: finalization never passes the
    database's clock, which every replica shares, less the grace. Bytes of the hour under way,
    applied by a replica with a right clock, then go into the open record, not an adjustment."""
    store, ahead_store = opened(pg_database), opened(pg_database)
    wall = int(time.time() * 1000)
    grace = Settings().grace_ms
    ahead = Collector(ahead_store, Settings(), lambda: int(time.time() * 1000) + 3 * HOUR)
    ahead.tick()
    with store.read() as conn:
        through = store.finalized_through(conn, lock=False)
    assert through <= window_start(wall - grace, HOUR) + HOUR  # (a tick at the hour's turn)
    # The hour under way, measured by a replica whose clock is right: usage, no adjustment.
    key = UsageKey(ACCT_A, 4, VM1, "", "public", window_start(wall, HOUR), window_start(wall, HOUR) + HOUR)
    with store.write() as conn:
        store.add_bytes(conn, {key: 1500}, {}, store.finalized_through(conn), wall)
    with store.read() as conn:
        adjustments = conn.execute(sa.select(sa.func.count()).select_from(usage_adjustments)).scalar()
        final = conn.execute(sa.select(usage_records.c.final).where(usage_records.c.resource == VM1)).scalar()
    assert (adjustments, final) == (0, False)


def test_an_event_committed_after_a_later_insert_reaches_every_replicas_sync(pg_database: str) -> None:
    """PostgreSQL gives ids at insert and commits in any order: replica A inserts an event (a
    lower id) and commits after replica B's event (a higher id). A third replica that synced in
    between must still learn A's event at its next sync: it may have come only to A (a shared
    RabbitMQ queue, a webhook, a correction). Before the fix the sync paged by id, its cursor
    passed B's id, and A's event was never learned there (its VM's bytes parked, its hours
    unknown to that replica)."""
    a_store, b_store, c_store = opened(pg_database), opened(pg_database), opened(pg_database)
    clock = lambda: T0 + 3 * HOUR  # noqa: E731
    b, c = Collector(b_store, Settings(), clock), Collector(c_store, Settings(), clock)
    c.sync()
    key_a, value_a = usage_event("VM.CREATE", "vm-only-on-a", ACCT_A, T0)
    ev = cloudstack.parse_event(value_a, key_a)
    normalized = lifecycle.as_read(ev).SerializeToString(deterministic=True)
    with a_store.write() as conn:  # replica A's transaction: its insert takes the lower id ...
        a_store.insert_events(conn, [(ev.event_id, ev.resource_uuid, ev.time, value_a, normalized, None)], T0)
        b.apply_events([Record(*reversed(usage_event("VM.CREATE", "vm-on-b", ACCT_B, T0)))])
        assert c.sync() == {"vm-on-b"}  # ... B's event, inserted later, is committed first
    assert c.sync() == {"vm-only-on-a"}
    assert "vm-only-on-a" in c.histories


def test_a_slower_replicas_older_evaluation_does_not_rearm_a_crossing_another_raised(store: Store) -> None:
    """Going below the threshold raises one alert, whichever replica evaluates. A replica whose
    evaluation rated the balances before an account's first credit (rating takes a while) and
    stores its result after another replica's newer evaluation raised that account's alert must
    not take the account out of the watch ("no longer below"): the newer state stands, and the
    next evaluation raises no second alert for the same fall."""
    cloud = Cloud(store)
    rated, go = threading.Event(), threading.Event()

    class SlowBook(BalanceBook):
        def balances(self, accounts: frozenset[str] | None, now_ms: int) -> list[Balance]:
            got = super().balances(accounts, now_ms)
            rated.set()  # rated; the state is written once the other replica has evaluated
            go.wait(10)
            return got

    slow = SlowBook(store, tariff, Thresholds(Decimal("5.00")))
    other = BalanceBook(store, tariff, Thresholds(Decimal("5.00")))
    raised: list[Crossing] = []
    thread = threading.Thread(target=lambda: raised.extend(slow.evaluate(cloud.now - 2000)))
    thread.start()
    assert rated.wait(10)
    with store.write() as conn:  # the account's first credit, added meanwhile: below 5.00
        stored.add_credit(conn, PAYER, Decimal("1.00"), "EUR", "test", "operator", cloud.now - 1500)
    raised += other.evaluate(cloud.now - 1000)
    go.set()
    thread.join(10)
    raised += other.evaluate(cloud.now)  # the next evaluation: the same fall, no new crossing
    assert [x.account for x in raised] == [PAYER]
    with store.read() as conn:
        assert len(stored.alerts(conn, None)) == 1


def _events(n: int, prefix: str) -> list[tuple[str, str, int, bytes, bytes, None]]:
    return [(f"{prefix}-{i}", f"vm-{i % 50}", 1000 + i, b"{}", b"", None) for i in range(n)]


def test_seqs_of_a_big_batch_of_events_are_given_in_a_few_statements_on_postgresql(pg_database: str) -> None:
    """A write storing thousands of lifecycle events gives them their seqs (consecutive, in id
    order) in a bounded number of statements on PostgreSQL: the seqs are given under the events
    counter's row lock, which every replica's event writes wait on until the commit, and an
    UPDATE per event (a round trip each on psycopg2, Debian 12's driver) held it for as long."""
    store = Store(pg_database)
    store.migrate()
    sent: list[int] = []

    def count(_conn: Any, _cursor: Any, statement: str, params: Any, _ctx: Any, many: bool) -> None:
        if statement.lstrip().upper().startswith("UPDATE LIFECYCLE_EVENTS"):
            sent.append(len(params) if many else 1)

    try:
        with store.write() as conn:
            store.insert_events(conn, _events(10, "before"), 5)
        sa.event.listen(store.engine, "before_cursor_execute", count)
        with store.write() as conn:
            store.insert_events(conn, _events(3000, "storm"), 5)
        assert sum(sent) <= 2, f"{sum(sent)} UPDATE statement(s) to give 3000 seqs"
        ev = lifecycle_events.c
        with store.read() as conn:
            rows = conn.execute(sa.select(ev.id, ev.seq).order_by(ev.id)).all()
        assert [seq for _, seq in rows] == list(range(1, 3000 + 11))
    finally:
        store.close()
