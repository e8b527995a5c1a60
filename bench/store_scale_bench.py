"""Two store operations at scale. `migration24`: migration 24 (every stored lifecycle event
gets its seq) on a PostgreSQL store of N events: its wall time, the locks it holds on the table,
and how long an older replica's event insert waits meanwhile, next to the same insert with no
migration running. `claim`: a hand-off claim round (collector/store/outbox.py `_pick`, both
sinks) at outbox depths, on SQLite and PostgreSQL, next to the same claim without migration 27's
EXISTS (an earlier version of the record still pending) in the same run, with the query plans."""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from tests.collector_support import ACCT_A, HOUR, T0, Clock, usage_event
from tests.handoff_support import pick_plans
from tests.harness.postgres import create_database

from kvmeter.collector.model import Record, Settings
from kvmeter.collector.schema import EVENT_SEQ, collector_state, lifecycle_events
from kvmeter.collector.schema_outbox import outbox_table
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store, schema_version
from kvmeter.collector.store import outbox as store_outbox

handoff_outbox = outbox_table(sa.MetaData())
SINKS = (store_outbox.TOPIC, store_outbox.WEBHOOK)


# -- migration 24 ---------------------------------------------------------------------------
def store_before_24(url: str, events: int) -> Store:
    """A PostgreSQL store as migration 23 left it, holding `events` lifecycle events: copies of
    one real stored event (its raw JSON and normalized form), each its own event and VM."""
    store = Store(url)
    store.migrate()
    collector = Collector(store, Settings(grace_ms=2 * HOUR), Clock(T0 + HOUR))
    collector.apply_events([Record(v, k) for k, v in [usage_event("VM.CREATE", "9b1f-seed", ACCT_A, T0)]])
    with store.write() as conn:
        conn.execute(sa.text("DROP INDEX ix_lifecycle_events_seq"))
        conn.execute(sa.text("ALTER TABLE lifecycle_events DROP COLUMN seq"))
        conn.execute(sa.delete(schema_version).where(schema_version.c.version == 24))
        conn.execute(sa.delete(collector_state).where(collector_state.c.name == EVENT_SEQ))
        conn.execute(
            sa.text(
                "INSERT INTO lifecycle_events (event_id, resource_uuid, time_ms, raw, normalized, "
                "received_ms, record_key) SELECT 'bench-' || g, md5(g::text)::uuid::text, "
                "time_ms + g, raw, normalized, received_ms + g, record_key "
                "FROM lifecycle_events, generate_series(1, :n) AS g WHERE event_id NOT LIKE 'bench-%'"
            ),
            {"n": events - 1},
        )
    with store.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(sa.text("VACUUM ANALYZE"))
    return store


def _older_replica_writes(url: str, stop: threading.Event, out: list[float]) -> None:
    """An older replica's event insert (no seq: it predates migration 24), one per transaction,
    each timed, until `stop`."""
    engine = sa.create_engine(url)
    n = 0
    with engine.connect() as conn:
        while not stop.is_set():
            n += 1
            t = time.perf_counter()
            conn.execute(
                sa.text(
                    "INSERT INTO lifecycle_events (event_id, resource_uuid, time_ms, raw, normalized, "
                    "received_ms) VALUES (:e, 'older', 0, '\\x7b7d', '\\x', 0)"
                ),
                {"e": f"older-{time.monotonic_ns()}-{n}"},
            )
            conn.commit()
            out.append((time.perf_counter() - t) * 1000)
            time.sleep(0.005)
    engine.dispose()


def _locks_held(url: str, stop: threading.Event, seen: set[str]) -> None:
    """The lock modes granted on the table to other sessions, sampled every 50 ms."""
    engine = sa.create_engine(url)
    query = sa.text(
        "SELECT mode FROM pg_locks WHERE relation = 'lifecycle_events'::regclass AND granted "
        "AND pid <> pg_backend_pid()"
    )
    with engine.connect() as conn:
        while not stop.wait(0.05):
            seen.update(str(row[0]) for row in conn.execute(query))
            conn.commit()
    engine.dispose()


def migration24_one(admin_dsn: str, events: int, log: Callable[[str], None]) -> dict[str, Any]:
    url = create_database(admin_dsn)
    t = time.perf_counter()
    store = store_before_24(url, events)
    log(f"migration24: {events} events stored in {time.perf_counter() - t:.1f} s")
    baseline: list[float] = []
    stop = threading.Event()
    writer = threading.Thread(target=_older_replica_writes, args=(url, stop, baseline))
    writer.start()
    time.sleep(1.0)
    stop.set()
    writer.join()
    during: list[float] = []
    locks: set[str] = set()
    stop = threading.Event()
    threads = [
        threading.Thread(target=_older_replica_writes, args=(url, stop, during)),
        threading.Thread(target=_locks_held, args=(url, stop, locks)),
    ]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    t = time.perf_counter()
    store.migrate()
    seconds = time.perf_counter() - t
    time.sleep(0.2)
    stop.set()
    for thread in threads:
        thread.join()
    ev = lifecycle_events.c
    with store.read() as conn:
        wrong = conn.execute(
            sa.select(sa.func.count()).where(ev.seq.is_distinct_from(ev.id), ~ev.event_id.like("older-%"))
        ).scalar()
    store.close()
    if wrong:
        raise RuntimeError(f"{wrong} events got a seq other than their id")
    return {
        "events": events,
        "migration_seconds": seconds,
        "events_per_s": events / seconds,
        "locks_seen": sorted(locks),
        "insert_baseline_p50_ms": statistics.median(baseline),
        "insert_baseline_max_ms": max(baseline),
        "insert_during_max_ms": max(during),
        "inserts_during": len(during),
    }


def migration24(pg_dsn: str, sizes: list[int], log: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for events in sizes:
        log(f"migration24: PostgreSQL, {events} lifecycle events")
        out[str(events)] = migration24_one(pg_dsn, events, log)
    return out


# -- claim ----------------------------------------------------------------------------------
def _item(n: int, record: int, version: int) -> dict[str, Any]:
    return {
        "transaction_id": f"kvm-{n:012d}",
        "account": f"acct-{record % 200:03d}",
        "usage_type": 4,
        "resource": f"9b1f0000-0000-4000-8000-{record:012d}",
        "offering": "",
        "traffic_type": "public",
        "start_ms": T0,
        "end_ms": T0 + HOUR,
        "quantity": "1000",
        "version": version,
    }


def _fill_outbox(store: Store, depth: int) -> None:
    """`depth` pending items: 1 record in 10 has 3 versions, 1 item in 100 refused by the
    webhook (a refused version 0 holds back its record's later ones)."""
    rows = []
    n = record = 0
    while n < depth:
        for version in range(3 if record % 10 == 0 else 1):
            item = _item(n, record, version)
            refused = T0 if n % 100 == 7 else None
            rows.append(
                {
                    "transaction_id": item["transaction_id"],
                    "account": item["account"],
                    "item": json.dumps(item, sort_keys=True),
                    "created_ms": T0,
                    "record": f"rec-{record:012d}",
                    "version": version,
                    "webhook_refused_ms": refused,
                    "webhook_retry_ms": refused,  # due again at once
                }
            )
            n += 1
        record += 1
    with store.write() as conn:
        for start in range(0, len(rows), 5000):
            conn.execute(sa.insert(handoff_outbox), rows[start : start + 5000])
    _vacuum(store)


def _vacuum(store: Store) -> None:
    if store.is_postgres:
        with store.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(sa.text("VACUUM ANALYZE"))


def _plain_pick(conn: Any, sink: str, limit: int, now_ms: int) -> list[int]:
    """The baseline: `_pick` without the EXISTS of migration 27 (the same phases, index, lock)."""
    return store_outbox.pick_free(conn, sink, limit, now_ms)


def _time(store: Store, pick: Callable[..., list[int]], limit: int, rounds: int) -> tuple[float, int]:
    """Median ms of one claim's picks (both sinks), each round seeing every item free."""
    times: list[float] = []
    got = 0
    for r in range(rounds):
        with store.write() as conn:
            t = time.perf_counter()
            got = sum(len(pick(conn, sink, limit, T0 + r)) for sink in SINKS)
            times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), got


def claim_one(url: str, depth: int, limit: int, rounds: int) -> dict[str, Any]:
    store = Store(url, outbox=True)
    store.migrate()
    _fill_outbox(store, depth)
    out: dict[str, Any] = {
        "plan": pick_plans(store, store_outbox.WEBHOOK, limit, T0)[0]
    }  # the webhook's pick, all pending
    ob = handoff_outbox.c
    setups = {
        "all pending": None,
        "topic confirmed, webhook down": sa.update(handoff_outbox).values(topic_sent_ms=T0),
        # then the webhook got all but the refused: only they are pending, offered by phase 2
        "only refused pending": sa.update(handoff_outbox)
        .where(ob.webhook_refused_ms.is_(None))
        .values(sent_ms=T0),
        # a receiver refusing most items for good: 9 in 10 refused (all due), only they pending
        "9 in 10 refused, only they pending": sa.update(handoff_outbox)
        .where(ob.id % 10 != 0)
        .values(
            sent_ms=None, webhook_sent_ms=None, webhook_refused_ms=T0 - ob.id, webhook_retry_ms=T0 - ob.id
        ),
    }
    for case, setup in setups.items():
        if setup is not None:
            with store.write() as conn:
                conn.execute(setup)
            _vacuum(store)  # as autovacuum would after such a change: not its dead rows' cost
        ms, got = _time(store, store_outbox._pick, limit, rounds)
        base_ms, base_got = _time(store, _plain_pick, limit, rounds)
        # alternate once more: the first timing of a store pays its cache warm-up
        ms = min(ms, _time(store, store_outbox._pick, limit, rounds)[0])
        base_ms = min(base_ms, _time(store, _plain_pick, limit, rounds)[0])
        out[case] = {
            "claim_ms": ms,
            "baseline_ms": base_ms,
            "ratio": ms / base_ms,
            "picked": got,
            "baseline_picked": base_got,
        }
    store.close()
    return out


def claim(
    pg_dsn: str | None, depths: list[int], *, limit: int, rounds: int, log: Callable[[str], None]
) -> dict[str, Any]:
    out: dict[str, Any] = {"limit": limit, "stores": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for depth in depths:
            stores = {"sqlite": f"sqlite:///{tmp}/claim-{depth}.db"}
            if pg_dsn:
                stores["postgresql"] = create_database(pg_dsn)
            for name, url in stores.items():
                log(f"claim: {name}, {depth} pending items")
                out["stores"].setdefault(name, {})[str(depth)] = claim_one(url, depth, limit, rounds)
    return out


# -- report ---------------------------------------------------------------------------------
Table = Callable[[list[str], list[list[str]]], str]


def migration_section(mig: dict[str, Any], table: Table) -> str:
    if "error" in mig:
        return f"5d. Migration 24: FAILED: {mig['error']}"
    rows = [
        [
            f"{int(k):,}",
            f"{r['migration_seconds']:.1f} s",
            f"{r['events_per_s']:,.0f}",
            ", ".join(r["locks_seen"]) or "-",
            f"{r['insert_baseline_max_ms']:.1f} ms",
            f"{r['insert_during_max_ms']:,.0f} ms",
        ]
        for k, r in mig.items()
        if k != "section_seconds"
    ]
    head = ["events", "migration", "events/s", "locks on the table", "insert alone (max)", "insert during"]
    return "5d. Migration 24 on PostgreSQL (an older replica's event insert):\n" + table(head, rows)


def claim_section(cl: dict[str, Any], table: Table) -> str:
    if "error" in cl:
        return f"5e. Hand-off claim: FAILED: {cl['error']}"
    rows = [
        [
            f"{name}, {int(d):,}, {case}",
            f"{r['claim_ms']:.2f}",
            f"{r['baseline_ms']:.2f}",
            f"{r['ratio']:.2f}",
        ]
        for name, depths in cl["stores"].items()
        for d, run in depths.items()
        for case, r in run.items()
        if case != "plan"
    ]
    head = ["store, pending items, case", "claim ms", "no EXISTS ms", "ratio"]
    return f"5e. Hand-off claim (both sinks, batch {cl['limit']}, median):\n" + table(head, rows)
