"""The usage store on both databases: same schema, same migrations, same answers; and the
replica-safety the collector relies on (two writers, one effect)."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

from kvmeter.collector import cloudstack
from kvmeter.collector import store as store_mod
from kvmeter.collector.model import Measure, Record, Settings, UsageKey
from kvmeter.collector.schema import UPDATED_FILLFACTOR
from kvmeter.collector.service import Collector
from kvmeter.collector.store import DeadLetter, Store, engine_url
from tests.collector_support import (
    ACCT_A,
    ACCT_B,
    HOUR,
    T0,
    VM1,
    Clock,
    M,
    Stream,
    events_of,
    insert_event,
    set_time_values,
    usage_event,
)


def key(usage_type: int = 4, start: int = T0, account: str = ACCT_A, resource: str = VM1) -> UsageKey:
    return UsageKey(
        account, usage_type, resource, "", "public" if usage_type > 3 else "", start, start + HOUR
    )


def byte_usage(store: Store) -> dict[UsageKey, int]:
    return {k: v for k, v in store.net_usage().items() if k.usage_type in (4, 5)}


def measure(seq: int, index: int, nbytes: int = 100) -> Measure:
    return Measure("s1", seq, index, "h1", T0, T0 + 60_000, "sent", nbytes, 1, "public", VM1,
                   "02:00:00:00:00:01", "203.0.113.10", "i-2-10-VM", "vnet0")  # fmt: skip


def test_migrations_are_numbered_idempotent_and_create_every_table(store: Store, store_url: str) -> None:
    latest = max(v for v, _ in store_mod.MIGRATIONS)
    assert store.version() == latest
    again = Store(store_url)
    assert again.migrate() == latest  # a second replica starting: nothing re-applied, no error
    again.close()
    names = set(sa.inspect(store.engine).get_table_names())
    assert set(store_mod.metadata.tables) <= names
    with store.read() as conn:
        rows = conn.execute(sa.select(store_mod.schema_version.c.version)).all()
    assert [r[0] for r in rows] == [v for v, _ in store_mod.MIGRATIONS]


@pytest.mark.pg
def test_postgresql_byte_tables_keep_room_to_update_rows_in_place(pg_database: str) -> None:
    """Every chunk adds to the open windows' byte records: their pages are filled only partly."""
    store = Store(pg_database)
    store.migrate()
    with store.read() as conn:
        query = (
            "SELECT relname, reloptions FROM pg_class WHERE relname IN ('usage_records', 'unbilled_bytes')"
        )
        rows = conn.execute(sa.text(query)).all()
    store.close()
    wanted = [f"fillfactor={UPDATED_FILLFACTOR}"]
    assert dict(rows) == {"usage_records": wanted, "unbilled_bytes": wanted}


def test_plain_postgresql_urls_map_to_the_installed_driver() -> None:
    assert engine_url("postgresql://u@h:5432/db").startswith(
        ("postgresql+psycopg://", "postgresql+psycopg2://")
    )
    assert engine_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    assert engine_url("sqlite:////var/lib/x.db") == "sqlite:////var/lib/x.db"


def test_stream_marks_only_rise(store: Store) -> None:
    with store.write() as conn:
        assert store.lock_marks(conn, {"s1": "h1"}).get("s1", 0) == 0
        store.set_marks(conn, {"s1": ("h1", 7)}, 1)
    with store.write() as conn:
        store.set_marks(conn, {"s1": ("h1", 3)}, 2)
        marks = store.lock_marks(conn, {"s1": "h1", "s2": "h2"})
    assert (marks["s1"], marks.get("s2", 0)) == (7, 0)
    assert store.marks()["s1"] == 7


def test_bytes_add_up_while_open_and_become_adjustments_once_final(store: Store) -> None:
    k, later = key(), key(start=T0 + HOUR)
    names = {k: ("i-2-10-VM", "UserVm")}
    with store.write() as conn:
        assert store.add_bytes(conn, {k: 100, later: 1}, names, store.finalized_through(conn), 1) == (2, 0)
    with store.write() as conn:
        store.add_bytes(conn, {k: 50}, {}, store.finalized_through(conn), 2)
    with store.write() as conn:
        assert store.finalize(conn, T0 + HOUR, 3) == 1
    with store.write() as conn:
        assert store.add_bytes(conn, {k: 7, later: 2}, {}, store.finalized_through(conn), 4) == (1, 1)
    rows = {r.key: r for r in store.usage(T0, T0 + 2 * HOUR)}
    assert (rows[k].recorded, rows[k].adjustment, rows[k].quantity, rows[k].final) == (150, 7, 157, True)
    assert rows[k].resource_name == "i-2-10-VM"
    assert (rows[later].quantity, rows[later].adjustment, rows[later].final) == (3, 0, False)
    with store.read() as conn:
        adj = conn.execute(
            sa.select(store_mod.usage_adjustments.c.delta, store_mod.usage_adjustments.c.reason)
        ).all()
    assert [(a[0], a[1]) for a in adj] == [(7, "late bytes")]


def test_a_key_new_to_a_final_window_is_a_zero_record_plus_adjustment(store: Store) -> None:
    with store.write() as conn:
        store.finalize(conn, T0 + HOUR, 1)
    k = key()
    with store.write() as conn:
        store.add_bytes(conn, {k: 42}, {}, store.finalized_through(conn), 2)
    (row,) = store.usage(T0, T0 + HOUR)
    assert (row.recorded, row.adjustment, row.quantity, row.final) == (0, 42, 42, True)


def test_time_values_are_whole_values_open_updates_final_adjusts(store: Store) -> None:
    k1, k2 = key(1), key(1, T0 + HOUR)
    with store.write() as conn:
        set_time_values(store, conn, VM1, {k1: 1000, k2: 500}, store.finalized_through(conn), 1)
    with store.write() as conn:
        store.finalize(conn, T0 + HOUR, 2)
    with store.write() as conn:  # a late event: k1 shrinks (final -> adjustment), k2 vanishes (open -> gone)
        written, adjusted = set_time_values(store, conn, VM1, {k1: 400}, store.finalized_through(conn), 3)
    assert (written, adjusted) == (1, 1)
    rows = {r.key: r for r in store.usage(T0, T0 + 2 * HOUR)}
    assert set(rows) == {k1}
    assert (rows[k1].recorded, rows[k1].adjustment, rows[k1].quantity) == (1000, -600, 400)
    with store.write() as conn:  # the same whole value again changes nothing
        assert set_time_values(store, conn, VM1, {k1: 400}, store.finalized_through(conn), 4) == (0, 0)
    with store.write() as conn:  # a tick (open_only) never touches final windows
        assert set_time_values(store, conn, VM1, {}, store.finalized_through(conn), 5, open_only=True) == (
            0,
            0,
        )
    assert store.net_usage() == {k1: 400}


def test_events_are_stored_once_by_id(store: Store) -> None:
    with store.write() as conn:
        assert insert_event(store, conn, "e1", VM1, T0, b"{}", b"n1", 1)
        assert not insert_event(store, conn, "e1", VM1, T0, b"{}", b"n1", 2)
        assert insert_event(store, conn, "e2", VM1, T0 - 1, b"{}", b"n2", 3)
        assert events_of(store, conn, VM1) == [b"n2", b"n1"]  # event time order
        assert store.events_since(conn, 0) == []  # sequenced at the commit
    with store.read() as conn:
        rows = store.events_since(conn, 0)
        assert [r[2] for r in rows] == [b"n1", b"n2"]  # commit order
        assert store.events_since(conn, rows[-1][0]) == []


def test_parked_and_quarantined_measures_keep_their_identity(store: Store) -> None:
    with store.write() as conn:
        store.park(conn, [measure(1, 0), measure(1, 1, 5)], 10)
        store.park(conn, [measure(1, 0)], 11)  # the same measure again: still one row
        store.quarantine(conn, [measure(2, 0, 999)], 12)
    assert [m.bytes for m in store.parked_rows()] == [100, 5]
    assert [m.bytes for m in store.quarantined_rows()] == [999]
    assert store.parked_rows()[0] == measure(1, 0)  # the Measure round-trips whole
    stats = store.stats(horizon_start_ms=11)
    assert (stats["parked_bytes"], stats["unattributed_bytes"], stats["quarantined_bytes"]) == (105, 105, 999)
    assert store.stats(horizon_start_ms=10)["unattributed_bytes"] == 0
    with store.write() as conn:
        assert store.take_parked(conn, macs=["02:00:00:00:00:99"]) == []
        taken = store.take_parked(conn, instances=[VM1])
        store.delete_parked(conn, [taken[0][0]])
    assert [m.bytes for m in store.parked_rows()] == [5]


def test_dead_letters_keep_raw_bytes_and_a_redelivery_is_not_a_new_letter(store: Store) -> None:
    letter = DeadLetter("measures", "t/0@5", b"\xff\x00raw", "malformed_protobuf", "not a MeasureBatch")
    with store.write() as conn:
        store.dead_letter(conn, [letter, letter], 1)
    with store.write() as conn:
        store.dead_letter(conn, [letter, DeadLetter("lifecycle", "f:1", b"\xff\x00raw", "x", "y")], 2)
    rows = store.dead_letter_rows()
    assert [(r["source"], bytes(r["raw"]), r["reason"]) for r in rows] == [
        ("measures", b"\xff\x00raw", "malformed_protobuf"),
        ("lifecycle", b"\xff\x00raw", "x"),
    ]


def test_two_replicas_applying_the_same_batches_at_once_bill_them_once(store_url: str) -> None:
    """Two collectors with their own connections race on the same records (a rebalance)."""
    clock = Clock(T0 + 3 * HOUR)
    stores = [Store(store_url) for _ in range(2)]
    stores[0].migrate()
    collectors = [Collector(s, Settings(), clock) for s in stores]
    key_value = usage_event("VM.CREATE", VM1, ACCT_A, T0 - HOUR)
    collectors[0].apply_event(key_value[1], key_value[0])
    stream = Stream("s-race")
    batches = [Record(stream.batch([M(T0 + i * 1000, T0 + i * 1000 + 500, 10 + i)])) for i in range(40)]
    errors: list[BaseException] = []

    def run(c: Collector) -> None:
        try:
            for i in range(0, len(batches), 5):
                c.apply_batches(batches[i : i + 5])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in collectors]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    expected = sum(10 + i for i in range(40))
    assert byte_usage(stores[0]) == {key(): expected}
    assert stores[0].marks() == {"s-race": 40}
    for s in stores:
        s.close()


def test_two_replicas_unparking_at_once_bill_a_parked_measure_once(store_url: str) -> None:
    clock = Clock(T0 + 3 * HOUR)
    stores = [Store(store_url) for _ in range(2)]
    stores[0].migrate()
    collectors = [Collector(s, Settings(), clock) for s in stores]
    stream = Stream("s-park")
    collectors[0].apply_batches([Record(stream.batch([M(T0 + i, T0 + i + 1, 1000 + i)])) for i in range(30)])
    assert len(stores[0].parked_rows()) == 30
    k, v = usage_event("VM.CREATE", VM1, ACCT_A, T0 - HOUR)
    ev = cloudstack.parse_event(v, k)
    with stores[0].write() as conn:  # stored by a third replica: both learn the owner on their next sync
        insert_event(stores[0], conn, ev.event_id, ev.resource_uuid, ev.time, v, ev.SerializeToString(), 1)
    outcomes: list[int] = []
    errors: list[BaseException] = []

    def run(c: Collector) -> None:
        try:
            outcomes.append(c.tick().unparked)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in collectors]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sum(outcomes) == 30
    assert byte_usage(stores[0]) == {key(): sum(1000 + i for i in range(30))}
    assert stores[0].parked_rows() == []
    for s in stores:
        s.close()


def test_values_the_database_refuses_are_dead_lettered_and_the_rest_flows(store: Store) -> None:
    collector = Collector(store, Settings(), Clock(T0 + 3 * HOUR))
    good_key, good_event = usage_event("VM.CREATE", VM1, ACCT_A, T0 - HOUR)
    _, huge_event = usage_event("VM.CREATE", "x" * 5000, ACCT_A, T0 - HOUR)
    out = collector.apply_events([Record(huge_event, None, "e1"), Record(good_event, good_key, "e2")])
    huge_stream, good_stream = Stream("s" * 3000), Stream("s-good")
    batches = [
        Record(huge_stream.batch([M(T0, T0 + 1000, 5)]), None, "m1"),
        Record(good_stream.batch([M(T0, T0 + 1000, 7)]), None, "m2"),
    ]
    out.add(collector.apply_batches(batches))
    assert byte_usage(store) == {key(): 7 + (5 if not store.is_postgres else 0)}
    if store.is_postgres:  # SQLite stores any length; PostgreSQL refuses what exceeds a column
        assert sorted((d.origin, d.reason) for d in out.dead_letters) == [
            ("e1", "unstorable"),
            ("m1", "unstorable"),
        ]
        assert {(r["origin"], r["reason"]) for r in store.dead_letter_rows()} == {
            ("e1", "unstorable"),
            ("m1", "unstorable"),
        }
    else:
        assert out.dead_letters == []


def test_parked_past_the_horizon_is_reported_unattributed_then_moves_to_a_late_owner(store: Store) -> None:
    clock = Clock(T0 + 2 * HOUR)
    collector = Collector(store, Settings(park_horizon_ms=HOUR), clock)
    vm3 = "vm-late-owner"
    collector.apply_batch(Stream("s3").batch([M(T0 + 20 * 60_000, T0 + 21 * 60_000, 777, instance=vm3)]))
    assert collector.tick().unattributed == 0  # parked 0 s ago: within the horizon
    assert byte_usage(store) == {}
    clock.now = T0 + 4 * HOUR
    assert collector.tick().unattributed == 1
    assert byte_usage(store) == {key(account="", resource=vm3): 777}  # reported, never guessed
    assert [m.bytes for m in store.parked_rows()] == [777]  # and still parked
    assert store.stats(collector.horizon_start())["unattributed_bytes"] == 777
    assert collector.tick().unattributed == 0  # reported once
    k, v = usage_event("VM.CREATE", vm3, ACCT_B, T0)
    out = collector.apply_event(v, k)
    assert out.unparked == 1
    assert byte_usage(store) == {key(account=ACCT_B, resource=vm3): 777}  # moved, conserved
    assert store.parked_rows() == []


def test_migration_2_upgrades_a_version_1_store(store: Store, store_url: str) -> None:
    with store.write() as conn:  # make it what a version-1 store looked like
        conn.execute(sa.text("ALTER TABLE parked_measures DROP COLUMN reported_ms"))
        conn.execute(sa.delete(store_mod.schema_version).where(store_mod.schema_version.c.version == 2))
    store.close()
    upgraded = Store(store_url)
    assert upgraded.migrate() == max(v for v, _ in store_mod.MIGRATIONS)
    columns = {c["name"] for c in sa.inspect(upgraded.engine).get_columns("parked_measures")}
    assert "reported_ms" in columns
    with upgraded.write() as conn:
        upgraded.park(conn, [measure(1, 0)], 1)
        assert [told for _, _, told in upgraded.take_parked(conn)] == [False]
    upgraded.close()


def test_out_of_order_batches_are_all_applied_once(store: Store) -> None:
    collector = Collector(store, Settings(), Clock(T0 + 3 * HOUR))
    k, v = usage_event("VM.CREATE", VM1, ACCT_A, T0 - HOUR)
    collector.apply_event(v, k)
    stream = Stream("s-ooo")
    b = [Record(stream.batch([M(T0 + i * 1000, T0 + i * 1000 + 1, 10**i)])) for i in range(6)]
    for chunk in ([b[3]], [b[0], b[5]], [b[1], b[3]], [b[4], b[4], b[0]]):
        collector.apply_batches(chunk)
    assert byte_usage(store) == {key(): 1 + 10 + 1000 + 10000 + 100000}  # seq 3 (100 bytes) not yet
    assert store.stats(0)["missing_batches"] == 1
    out = collector.apply_batches([b[2], b[2]])
    assert (out.batches, out.duplicates) == (1, 1)
    assert byte_usage(store) == {key(): 111111}
    assert store.stats(0)["missing_batches"] == 0
    assert collector.apply_batches(b).duplicates == 6
    assert byte_usage(store) == {key(): 111111}


def test_an_event_committed_behind_the_sync_cursor_is_still_learned(store: Store) -> None:
    """An event stored without a seq (an older replica's, in a rolling upgrade) between two of
    this replica's looks for such events (store.number_stragglers): the replica still reads the
    event from the topic itself, finds it stored, and must learn it anyway."""
    collector = Collector(store, Settings(), Clock(T0 + 3 * HOUR))
    k1, e1 = usage_event("VM.CREATE", VM1, ACCT_A, T0 - HOUR)
    collector.apply_events([Record(e1, k1)])
    store.straggler_check_s = 3600.0
    assert store.number_stragglers() == 0  # its last look, before the event below
    k2, e2 = usage_event("VM.CREATE", "vm-behind", ACCT_B, T0 - HOUR)
    ev = cloudstack.parse_event(e2, k2)
    with store.write() as conn:  # stored by an older replica: no seq, an id below our cursor
        conn.execute(
            sa.insert(store_mod.lifecycle_events).values(
                id=-5, event_id=ev.event_id, resource_uuid=ev.resource_uuid, time_ms=ev.time, raw=e2,
                normalized=ev.SerializeToString(deterministic=True), received_ms=1,
            )
        )  # fmt: skip
    assert collector.sync() == set()  # not numbered yet: the cursor steps over it
    assert collector.apply_events([Record(e2, k2)]).known_events == 1
    out = collector.apply_batch(Stream("s-behind").batch([M(T0, T0 + 1000, 321, instance="vm-behind")]))
    assert out.parked == 0
    assert byte_usage(store) == {key(account=ACCT_B, resource="vm-behind"): 321}


def test_ticks_grow_the_open_window_and_finalize_closed_ones(store: Store) -> None:
    clock = Clock(T0 + 10 * 60_000)
    collector = Collector(store, Settings(grace_ms=HOUR), clock)
    for event in ("VM.CREATE", "VM.START"):
        k, v = usage_event(event, VM1, ACCT_A, T0)
        collector.apply_event(v, k)
    running = lambda: {r.key.window_start_ms - T0: (r.quantity, r.final) for r in store.usage(0, 2**62)  # noqa: E731
                       if r.key.usage_type == 1}  # fmt: skip
    assert running() == {0: (10 * 60_000, False)}
    clock.now = T0 + 2 * HOUR + 30 * 60_000
    collector.tick()
    assert running() == {0: (HOUR, True), HOUR: (HOUR, False), 2 * HOUR: (30 * 60_000, False)}
    clock.now = T0 + 3 * HOUR + 5 * 60_000
    out = collector.tick()
    assert running() == {
        0: (HOUR, True),
        HOUR: (HOUR, True),
        2 * HOUR: (HOUR, False),
        3 * HOUR: (5 * 60_000, False),
    }
    assert out.adjustments == 0  # time passing never touches a final window
