"""Replicas on one PostgreSQL store, each case forced with real concurrency: two or three
Store/Collector/Relay objects (own engines, own connections) on one database, threads, and
events or hooks to pin the interleaving. A retention pass and an adjustment of the same record
(either waiting on the other) give each version once; a lifecycle recompute racing usage
pruning bills no pruned window again; a relay whose lease lapsed does not release the lease of
the relay now sending."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from kvmeter.collector import billable
from kvmeter.collector.model import Record, Settings, UsageKey
from kvmeter.collector.prune import Pruner
from kvmeter.collector.retention import DAY_MS, RetentionPolicy
from kvmeter.collector.schema import handoff_outbox, usage_adjustments
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store
from tests.collector_support import ACCT_A, HOUR, T0, VM1, usage_event

NOW = T0 + 40 * DAY_MS
USAGE_ONLY = RetentionPolicy(  # a valid [retention]: nothing kept longer than usage (problems())
    lifecycle_events_ms=30 * DAY_MS,
    parked_measures_ms=30 * DAY_MS,
    quarantined_measures_ms=None,
    dead_letters_resolved_ms=None,
    dead_letters_open_ms=None,
    stream_marks_ms=None,
    corrections_ms=None,
    domain_witness_ms=None,
    outbox_sent_ms=None,
    usage_ms=30 * DAY_MS,
)
assert USAGE_ONLY.problems() == []


_OPEN: list[Store] = []


@pytest.fixture(autouse=True)
def _closed() -> Iterator[None]:
    """Every store a test opened is closed after it, the test's assertions passed or not."""
    yield
    while _OPEN:
        _OPEN.pop().close()


def opened(url: str, *, outbox: bool = True) -> Store:
    store = Store(url, outbox=outbox)
    store.migrate()
    _OPEN.append(store)
    return store


def key(start: int = T0) -> UsageKey:
    return UsageKey(ACCT_A, 4, VM1, "", "public", start, start + HOUR)


def late_bytes(store: Store, increments: dict[UsageKey, int], now: int) -> None:
    with store.write() as conn:
        store.add_bytes(conn, increments, {}, store.finalized_through(conn), now)


def items(store: Store) -> list[dict[str, Any]]:
    with store.read() as conn:
        rows = conn.execute(sa.select(handoff_outbox.c.item).order_by(handoff_outbox.c.id)).scalars()
        return [json.loads(r) for r in rows]


def lock_waiters(dsn: str) -> int:
    """Backends of this database waiting on a heavyweight lock right now."""
    plain = dsn.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'"
        ).fetchone()
        return int(row[0]) if row else 0


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Thread(threading.Thread):
    """A thread that re-raises its exception on join()."""

    def __init__(self, target: Callable[[], Any]):
        super().__init__(daemon=True)
        self._fn, self.error, self.result = target, None, None

    def run(self) -> None:
        try:
            self.result = self._fn()
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float | None = 30) -> None:  # type: ignore[override]
        super().join(timeout)
        assert not self.is_alive(), "thread hung"
        if self.error is not None:
            raise self.error


def adjusted_window(url: str) -> tuple[Store, UsageKey]:
    """One final byte window of VM1 handed off as versions 0, 1, 2 (as test_handoff_ids)."""
    store = opened(url)
    k = key()
    late_bytes(store, {k: 100}, 1)
    with store.write() as conn:
        store.finalize(conn, T0 + HOUR, 2)
    late_bytes(store, {k: 7}, 3)
    late_bytes(store, {k: -2}, 4)
    return store, k


def test_an_adjustment_waiting_on_a_pruned_record_continues_after_its_kept_version(pg_database: str) -> None:
    """Replica P prunes the adjusted record (its version 2 kept in record_versions); replica A
    adjusts the same window meanwhile (a dead letter redriven late). A read the kept versions
    before P committed, then waited on the record's row lock; when P commits, A's upsert finds
    no row: its version continues after the kept one (3), not 1 again, whose transaction id the
    outbox holds already (the new item would be dropped: the +5 bytes never billed)."""
    setup, k = adjusted_window(pg_database)
    prune_store, adjust_store = opened(pg_database), opened(pg_database)
    deleted, go = threading.Event(), threading.Event()
    original = prune_store.delete_keys

    def delete_then_hold(conn: Any, kind: str, keys: Any) -> int:
        n = original(conn, kind, keys)
        if kind == "usage_records":  # rows deleted, versions kept, not yet committed
            deleted.set()
            assert go.wait(20)
        return n

    prune_store.delete_keys = delete_then_hold  # type: ignore[method-assign]
    pruner = Thread(lambda: Pruner(prune_store, USAGE_ONLY, lambda: NOW).run())
    pruner.start()
    assert deleted.wait(20)
    adjuster = Thread(lambda: late_bytes(adjust_store, {k: 5}, NOW))
    adjuster.start()
    wait_until(lambda: lock_waiters(pg_database) >= 1, "the adjustment to wait on the pruned row")
    go.set()
    pruner.join()
    adjuster.join()

    with setup.read() as conn:
        made = conn.execute(
            sa.select(usage_adjustments.c.version, usage_adjustments.c.delta).where(
                usage_adjustments.c.delta == 5
            )
        ).all()
    handed = [(i["version"], i["quantity"]) for i in items(setup) if i["quantity"] == 5]
    # version 3 (after the kept 2), handed off; not version 1 again, whose transaction id the
    # outbox holds already (the item of +7)
    assert ([tuple(r) for r in made], handed) == ([(3, 5)], [(3, 5)]), (
        f"adjustment (version, delta) made: {[tuple(r) for r in made]}; handed off: {handed}"
    )


def test_a_prune_keeps_the_version_of_a_record_adjusted_meanwhile(pg_database: str) -> None:
    """Replica A adjusts the record (version 2 -> 3, in its outbox) and has not committed; P
    locks the record before it keeps its version, so it keeps 3, not the 2 committed before A:
    the next change to the window is version 4, not 'version 3' again (an id already used, the
    outbox would drop it)."""
    setup, k = adjusted_window(pg_database)
    prune_store, adjust_store = opened(pg_database), opened(pg_database)
    pruner = None
    with adjust_store.write() as conn:
        adjust_store.add_bytes(conn, {k: 5}, {}, adjust_store.finalized_through(conn), NOW)
        pruner = Thread(lambda: Pruner(prune_store, USAGE_ONLY, lambda: NOW).run())
        pruner.start()
        wait_until(lambda: lock_waiters(pg_database) >= 1, "the prune's DELETE to wait on the record")
    pruner.join()  # A committed version 3; P deleted the record

    late_bytes(setup, {k: 11}, NOW + 1)  # the window changes once more
    with setup.read() as conn:
        versions = sorted(
            conn.execute(
                sa.select(usage_adjustments.c.version).where(usage_adjustments.c.delta == 11)
            ).scalars()
        )
    handed = [i["transaction_id"] for i in items(setup) if i["quantity"] == 11]
    assert (versions, handed) == ([4], [billable.transaction_id(k, 4)]), (
        f"the change after version 3 got version(s) {versions}; outbox items of it: {len(handed)}"
    )


def test_a_recompute_racing_usage_pruning_bills_no_pruned_window_again(pg_database: str) -> None:
    """A VM running for 40 days: its time records of the first 10 days are final and handed
    off; usage retention (30 days) prunes them, its events stay (its history is open). Replica E
    applies a new event of the VM while P prunes: P takes the resources' locks on its page, so
    E either reads the records before they go or the raised watermark after, never a pruned
    window as unbilled (an adjustment of its whole hour, billed again)."""
    settings = Settings()
    base = opened(pg_database)
    clock = [NOW - 3 * HOUR]
    c0 = Collector(base, settings, lambda: clock[0])
    create = usage_event("VM.CREATE", VM1, ACCT_A, T0)
    start = usage_event("VM.START", VM1, ACCT_A, T0 + 1)
    c0.apply_events([Record(v, k) for k, v in (create, start)])
    c0.tick()  # windows up to NOW - 5h final (and handed off as version 0)
    with base.read() as conn:
        assert not conn.execute(sa.select(sa.func.count()).select_from(usage_adjustments)).scalar()

    replica_e, replica_p = opened(pg_database), opened(pg_database)
    collector_e = Collector(replica_e, settings, lambda: NOW)
    floor_read, pruned = threading.Event(), threading.Event()
    read_floor = replica_e.usage_pruned_through

    def floor_then_wait(conn: Any) -> int:
        value = read_floor(conn)
        floor_read.set()
        assert pruned.wait(20)
        return value

    replica_e.usage_pruned_through = floor_then_wait  # type: ignore[method-assign]
    stop = usage_event("VM.STOP", VM1, ACCT_A, NOW - HOUR)
    e = Thread(lambda: collector_e.apply_events([Record(stop[1], stop[0])]))
    e.start()
    assert floor_read.wait(20)
    pruner = Thread(lambda: Pruner(replica_p, USAGE_ONLY, lambda: NOW).run())
    pruner.start()
    # Today the pass runs to its end beside E; a pass that waits for E (a lock) lets E go on.
    wait_until(lambda: not pruner.is_alive() or lock_waiters(pg_database) >= 1, "the pass")
    pruned.set()
    e.join()
    pruner.join()

    assert pruner.result["usage_records"] >= 240
    with base.read() as conn:
        adjustments = conn.execute(
            sa.select(usage_adjustments.c.window_end_ms, usage_adjustments.c.delta).where(
                usage_adjustments.c.window_end_ms <= NOW - 30 * DAY_MS
            )
        ).all()
    rebilled = sum(r[1] for r in adjustments)
    assert not adjustments, (
        f"{len(adjustments)} pruned windows billed again ({rebilled / HOUR:.0f} VM hours twice)"
    )


def test_a_relay_whose_lease_lapsed_leaves_the_lease_of_the_relay_now_sending(pg_database: str) -> None:
    """Relay A's renewals fail for a while (the database unreachable from A: 'a lapse only
    risks a duplicate'), so its lease lapses mid-round; relay B claims the rows and delivers
    slowly, renewing its lease. A's sink then fails and A releases its round: only rows still
    under A's own lease are released, so relay C claims none of the rows B is still sending."""
    from dataclasses import replace

    from prometheus_client import CollectorRegistry

    from kvmeter.collector.config_handoff import HandoffConfig
    from kvmeter.collector.outbox_relay import HandoffMetrics, Relay
    from tests.integration.test_handoff_relay import fill, outbox_ids

    cfg = replace(HandoffConfig(), webhook_url="http://127.0.0.1:9/unused", lease_s=0.6, batch_size=100)

    class Sink:
        name = "webhook"

        def __init__(self, release: threading.Event | None = None, fail: bool = False):
            self.release, self.fail = release, fail
            self.started = threading.Event()
            self.got: list[str] = []

        def deliver(self, rows: Any) -> tuple[list[int], str]:
            self.started.set()
            if self.release is not None:
                assert self.release.wait(20)
            if self.fail:
                return [], "receiver answered 503"
            self.got += [r.transaction_id for r in rows]
            return [r.id for r in rows], ""

        def close(self) -> None:
            return

    def relay(store: Store, sink: Sink) -> Relay:
        r = Relay(store, cfg, HandoffMetrics(CollectorRegistry(), store))
        r.sinks = [sink]
        return r

    fill(pg_database).close()
    store_a, store_b, store_c = opened(pg_database), opened(pg_database), opened(pg_database)
    expected = outbox_ids(store_a)

    def unreachable(*_: Any) -> int:
        raise sa.exc.OperationalError("renew", {}, Exception("connection refused"))

    store_a.renew_outbox = unreachable  # type: ignore[method-assign]
    a_fails, b_done = threading.Event(), threading.Event()
    sink_a, sink_b, sink_c = Sink(a_fails, fail=True), Sink(b_done), Sink()
    a = Thread(lambda: relay(store_a, sink_a).round())
    a.start()
    assert sink_a.started.wait(10)
    time.sleep(cfg.lease_s * 1.5)  # A's lease lapsed
    b = Thread(lambda: relay(store_b, sink_b).round())
    b.start()
    assert sink_b.started.wait(10)  # B holds every row and renews its lease
    a_fails.set()
    a.join()  # A's round ends: its rows "released"
    time.sleep(0.1)
    try:
        claimed, _ = relay(store_c, sink_c).round()
        assert b.is_alive(), "B is still delivering"
        assert (claimed, sorted(sink_c.got)) == (0, []), (
            f"relay C claimed {claimed} rows relay B holds under a live lease and sent them again"
        )
    finally:
        b_done.set()
        b.join()
    while relay(store_b, sink_b).round()[0]:  # a record's later versions: one round each
        pass
    assert set(sink_b.got) == expected
