"""The outbox and transaction ids in the store, on both databases: items written in the
finalizing (or adjusting) transaction, versions per record, ids equal after replaying the same
inputs into a fresh store, adjustments paged by commit order while two writers race."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from kvmeter.collector import billable
from kvmeter.collector.api import create_app
from kvmeter.collector.model import Record, Settings, UsageKey
from kvmeter.collector.schema import collector_state, handoff_outbox, schema_version, usage_adjustments
from kvmeter.collector.schema_outbox import ADJUSTMENT_SEQ
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store
from tests.collector_support import (
    ACCT_A,
    ACCT_B,
    HOUR,
    MIN,
    T0,
    VM1,
    VM2,
    Clock,
    M,
    Stream,
    scenario,
    usage_event,
)
from tests.harness import postgres


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.pg)])
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Two fresh, empty stores of one kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/b.db"
        return
    dsn = str(request.getfixturevalue("pg_dsn"))
    yield postgres.create_database(dsn), postgres.create_database(dsn)


def opened(url: str, *, outbox: bool = True) -> Store:
    store = Store(url, outbox=outbox)
    store.migrate()
    return store


def key(start: int = T0, account: str = ACCT_A, usage_type: int = 4) -> UsageKey:
    return UsageKey(account, usage_type, VM1, "", "public", start, start + HOUR)


def outbox_items(store: Store) -> list[dict]:  # type: ignore[type-arg]
    with store.read() as conn:
        rows = conn.execute(sa.select(handoff_outbox.c.item).order_by(handoff_outbox.c.id)).scalars()
        return [json.loads(r) for r in rows]


def test_finalization_writes_one_item_per_nonzero_record_in_the_same_transaction(
    urls: tuple[str, str],
) -> None:
    store = opened(urls[0])
    k, zero, later = key(), key(account=ACCT_B), key(T0 + HOUR)
    with store.write() as conn:
        store.add_bytes(conn, {k: 150, zero: 5, later: 1}, {k: ("i-2-10-VM", "UserVm")}, 0, 1)
        store.add_bytes(conn, {zero: -5}, {}, 0, 1)  # nets to zero: nothing to bill
    # A finalization that rolls back leaves neither final records nor items behind.
    with pytest.raises(RuntimeError, match="crash"):
        _finalize_then_crash(store)
    assert outbox_items(store) == []
    assert not any(r.final for r in store.usage(T0, T0 + HOUR))
    with store.write() as conn:
        assert store.finalize(conn, T0 + HOUR, 3) == 2
    (item,) = outbox_items(store)
    assert item["transaction_id"] == billable.transaction_id(k, 0)
    assert (item["kind"], item["version"], item["quantity"], item["unit"]) == ("record", 0, 150, "bytes")
    assert (item["account"], item["resource_name"], item["start_ms"]) == (ACCT_A, "i-2-10-VM", T0)
    store.close()


def _finalize_then_crash(store: Store) -> None:
    with store.write() as conn:
        store.finalize(conn, T0 + HOUR, 2)
        raise RuntimeError("crash before commit")


def test_each_adjustment_is_the_records_next_version_with_its_own_id(urls: tuple[str, str]) -> None:
    store = opened(urls[0])
    k, new = key(), key(account=ACCT_B)
    with store.write() as conn:
        store.add_bytes(conn, {k: 100}, {}, 0, 1)
    with store.write() as conn:
        store.finalize(conn, T0 + HOUR, 2)
    for now, delta in ((3, 7), (4, -2)):
        with store.write() as conn:
            store.add_bytes(conn, {k: delta, new: delta * 10}, {}, store.finalized_through(conn), now)
    adjustments = store.adjustments(0)
    assert [(a.key, a.version, a.delta) for a in adjustments] == [
        (k, 1, 7), (new, 1, 70), (k, 2, -2), (new, 2, -20)
    ]  # fmt: skip
    assert [a.seq for a in adjustments] == [1, 2, 3, 4]  # commit order, dense
    items = outbox_items(store)
    assert [i["transaction_id"] for i in items] == [
        billable.transaction_id(k, 0),
        *(a.transaction_id for a in adjustments),
    ]
    assert [(i["kind"], i["quantity"], i["reason"]) for i in items[1:]] == [
        ("adjustment", 7, "late bytes"), ("adjustment", 70, "late bytes"),
        ("adjustment", -2, "late bytes"), ("adjustment", -20, "late bytes"),
    ]  # fmt: skip
    assert len({i["transaction_id"] for i in items}) == 5
    store.close()


def test_without_a_hand_off_nothing_goes_to_the_outbox_but_ids_and_seqs_are_kept(
    urls: tuple[str, str],
) -> None:
    store = opened(urls[0], outbox=False)
    with store.write() as conn:
        store.finalize(conn, T0 + HOUR, 1)
    with store.write() as conn:
        store.add_bytes(conn, {key(): 5}, {}, store.finalized_through(conn), 2)
    assert outbox_items(store) == []
    (adj,) = store.adjustments(0)
    assert (adj.seq, adj.version, adj.transaction_id) == (1, 1, billable.transaction_id(key(), 1))
    store.close()


def _run(store: Store) -> Collector:
    """The shared scenario live: finalization at T0+6h, then late bytes and a late stop."""
    clock = Clock(T0 + 3 * HOUR)
    collector = Collector(store, Settings(), clock)
    sc = scenario()
    for k, v in sc.events:
        collector.apply_event(v, k)
    collector.apply_batches([Record(b) for b in sc.batches])
    collector.tick()
    clock.now = T0 + 6 * HOUR
    collector.tick()
    late = Stream("stream-late", "h9")
    collector.apply_batches([Record(late.batch([M(T0 + 5 * MIN, T0 + 6 * MIN, 4242)]))])
    stop = usage_event("VM.STOP", VM2, ACCT_B, T0 + HOUR + 30 * MIN)
    collector.apply_event(stop[1], stop[0])
    clock.now = T0 + 7 * HOUR
    collector.tick()
    return collector


def test_transaction_ids_are_the_same_after_replaying_the_same_inputs_into_a_fresh_store(
    urls: tuple[str, str],
) -> None:
    live, rebuilt = opened(urls[0]), opened(urls[1])
    _run(live)
    _run(rebuilt)
    first, again = outbox_items(live), outbox_items(rebuilt)
    kinds = {i["kind"] for i in first}
    assert kinds == {"record", "adjustment"}, "the scenario finalizes records and adjusts some"
    assert len(first) > 10
    assert len({i["transaction_id"] for i in first}) == len(first)
    assert sorted(i["transaction_id"] for i in first) == sorted(i["transaction_id"] for i in again)
    assert sorted(json.dumps(i, sort_keys=True) for i in first) == sorted(
        json.dumps(i, sort_keys=True) for i in again
    )
    # The ids listed by /v1/adjustments are the outbox's.
    listed = {a.transaction_id for a in live.adjustments(0)}
    assert listed == {i["transaction_id"] for i in first if i["kind"] == "adjustment"}
    live.close()
    rebuilt.close()


def test_migration_14_numbers_the_adjustments_of_an_older_store(urls: tuple[str, str]) -> None:
    store = opened(urls[0], outbox=False)
    with store.write() as conn:
        store.add_bytes(conn, {key(): 1}, {}, 0, 1)
        store.finalize(conn, T0 + HOUR, 1)
    for now in (2, 3):
        with store.write() as conn:
            store.add_bytes(conn, {key(): now, key(account=ACCT_B): now}, {}, T0 + HOUR, now)
    # Back to what a store before migration 14 holds: no versions, no seqs, no counter.
    with store.write() as conn:
        conn.execute(sa.update(usage_adjustments).values(version=0, seq=None))
        conn.execute(sa.text("UPDATE usage_records SET version = 0"))
        conn.execute(sa.delete(collector_state).where(collector_state.c.name == ADJUSTMENT_SEQ))
        conn.execute(sa.delete(schema_version).where(schema_version.c.version == 14))
    store.migrate()
    assert [(a.key.account, a.version, a.seq) for a in store.adjustments(0)] == [
        (ACCT_A, 1, 1), (ACCT_B, 1, 2), (ACCT_A, 2, 3), (ACCT_B, 2, 4)
    ]  # fmt: skip
    with store.write() as conn:  # the next one goes on from there
        store.add_bytes(conn, {key(): 9}, {}, T0 + HOUR, 4)
    last = store.adjustments(0)[-1]
    assert (last.version, last.seq) == (3, 5)
    store.close()


@pytest.mark.pg
def test_two_writers_on_postgresql_and_adjustment_pages_miss_nothing(pg_database: str) -> None:
    """Two replicas commit adjustments in an order unlike their insert order while a client
    pages /v1/adjustments from its cursor: every row is listed once."""
    writers = [Store(pg_database, outbox=True) for _ in range(2)]
    writers[0].migrate()
    with writers[0].write() as conn:
        writers[0].finalize(conn, T0 + 24 * HOUR, 1)
    reader = Store(pg_database)
    client = create_app(reader).test_client()
    per_writer, errors = 40, []
    done = threading.Event()

    def write(n: int, store: Store) -> None:
        rng = random.Random(n)
        try:
            for i in range(per_writer):
                k = key(T0 + (i % 24) * HOUR, account=f"acct-{n}-{i % 3}")
                with store.write() as conn:
                    store.add_bytes(conn, {k: i + 1}, {}, T0 + 24 * HOUR, 10 + i)
                    time.sleep(rng.random() * 0.02)  # hold the transaction open a while
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    seen: list[tuple[int, str]] = []

    def page_all() -> None:
        after = 0  # a poller: pages from its cursor, then waits and goes on after its last seq
        while True:
            finished = done.is_set()
            listing = f"/v1/adjustments?since=0&limit=7&after={after}"
            url = listing
            while True:
                body = client.get(url).get_json()
                seen.extend((a["seq"], a["transaction_id"]) for a in body["adjustments"])
                if body["adjustments"]:
                    after = body["adjustments"][-1]["seq"]
                if body["next"] is None:
                    break
                url = f"{listing}&cursor={body['next']}"  # what the Link header names
            if finished:
                return
            time.sleep(0.005)

    threads = [threading.Thread(target=write, args=(n, s)) for n, s in enumerate(writers)]
    pager = threading.Thread(target=page_all)
    for t in [*threads, pager]:
        t.start()
    for t in threads:
        t.join(120)
    done.set()
    pager.join(120)
    assert not errors
    everything = [(a.seq, a.transaction_id) for a in reader.adjustments(0)]
    assert len(everything) == 2 * per_writer
    assert seen == everything  # each once, in seq order, none stepped over
    for s in [*writers, reader]:
        s.close()
