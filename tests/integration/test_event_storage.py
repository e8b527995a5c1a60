"""Lifecycle events are stored once on both stores: the payload as received (with the record key
where it adds to it), beside the small part of the event histories are built from; a store of
the old layout (the whole payload twice) migrates without losing an event."""

from __future__ import annotations

import json

import sqlalchemy as sa

from kvmeter.collector import cloudstack, lifecycle
from kvmeter.collector import store as store_mod
from kvmeter.collector.model import Record, Settings
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store
from kvmeter.proto import pb
from tests.collector_support import ACCT_A, ACCT_B, HOUR, T0, VM1, VM2, Clock, usage_event

NOW = T0 + 3 * HOUR
EVENTS = store_mod.lifecycle_events


def stored(store: Store) -> list[dict[str, object]]:
    ev = EVENTS.c
    with store.read() as conn:
        query = sa.select(ev.event_id, ev.resource_uuid, ev.raw, ev.normalized, ev.record_key).order_by(ev.id)
        return [dict(row) for row in conn.execute(query).mappings()]


def test_a_big_event_is_stored_once(store: Store) -> None:
    key, value = usage_event("VM.CREATE", VM1, ACCT_A, T0)
    big = json.dumps({**json.loads(value), "description": "d" * 100_000, "user": "u-1"}).encode()
    Collector(store, Settings(), Clock(NOW)).apply_events([Record(big, key)])
    (row,) = stored(store)
    assert bytes(row["raw"]) == big
    assert len(bytes(row["normalized"])) < 300  # not the payload again
    assert row["record_key"] is None  # the bus keys by the resource uuid: nothing to add
    full = cloudstack.parse_event(big, key)
    assert full.attributes["description"] == "d" * 100_000  # what a rebuild gets back from raw
    assert lifecycle.as_read(full).SerializeToString(deterministic=True) == bytes(row["normalized"])


def test_a_key_that_names_what_the_payload_does_not_is_kept(store: Store) -> None:
    # An action event naming no entity: the resource is the record's key alone.
    when = "2024-05-14 10:00:00 +0000"
    value = json.dumps({"status": "Completed", "event": "VM.REBOOT", "entity": "VirtualMachine",
                        "user": "u", "account": ACCT_A, "eventDateTime": when}).encode()  # fmt: skip
    _, usage = usage_event("VM.START", VM2, ACCT_B, T0)
    Collector(store, Settings(), Clock(NOW)).apply_events(
        [Record(value, VM1.encode()), Record(usage, b"other")]
    )
    rows = {r["resource_uuid"]: r for r in stored(store)}
    assert rows[VM1]["record_key"] is None  # the key is the resource uuid column already
    assert bytes(rows[VM2]["record_key"]) == b"other"  # differs from the payload's: kept
    for row in rows.values():
        key = cloudstack.kept_key(
            None if row["record_key"] is None else bytes(row["record_key"]), str(row["resource_uuid"])
        )
        again = lifecycle.as_read(cloudstack.parse_event(bytes(row["raw"]), key))
        assert again.SerializeToString(deterministic=True) == bytes(row["normalized"])


def test_a_store_of_the_old_layout_migrates_without_losing_an_event(store: Store, store_url: str) -> None:
    """Events as an older kvmeter stored them (every key of the payload in the normalized
    event too, a differing key as the kafka_key attribute) are slimmed in place; every one is
    kept, and the histories they give are the same."""
    records = [
        (*usage_event("VM.CREATE", VM1, ACCT_A, T0 - HOUR), "x" * 5000),
        (*usage_event("VM.START", VM1, ACCT_A, T0), ""),
        (*usage_event("VM.CREATE", VM2, ACCT_B, T0), ""),
    ]
    old = []
    for i, (key, value, note) in enumerate(records):
        raw = json.dumps({**json.loads(value), "description": note}).encode() if note else value
        given = b"a-different-key" if i == 2 else key
        old.append((raw, cloudstack.parse_event(raw, given)))
    assert old[2][1].attributes["kafka_key"] == "a-different-key"
    latest = max(v for v, _ in store_mod.MIGRATIONS)
    with store.write() as conn:  # make it what a store before migration 11 looked like
        conn.execute(sa.text("ALTER TABLE lifecycle_events DROP COLUMN record_key"))
        conn.execute(sa.delete(store_mod.schema_version).where(store_mod.schema_version.c.version == 11))
        for n, (raw, ev) in enumerate(old):
            conn.execute(
                sa.text("INSERT INTO lifecycle_events (event_id, resource_uuid, time_ms, raw, normalized, "
                        "received_ms) VALUES (:e, :r, :t, :raw, :n, :at)"),
                {"e": ev.event_id, "r": ev.resource_uuid, "t": ev.time, "raw": raw,
                 "n": ev.SerializeToString(deterministic=True), "at": n},
            )  # fmt: skip
    store.close()

    upgraded = Store(store_url)
    assert upgraded.migrate() == latest
    rows = stored(upgraded)
    assert [r["event_id"] for r in rows] == [ev.event_id for _, ev in old]  # every event, in order
    assert [bytes(r["raw"]) for r in rows] == [raw for raw, _ in old]
    slim = [lifecycle.as_read(ev) for _, ev in old]
    assert [bytes(r["normalized"]) for r in rows] == [ev.SerializeToString(deterministic=True) for ev in slim]
    assert [r["record_key"] and bytes(r["record_key"]) for r in rows] == [None, None, b"a-different-key"]
    with upgraded.read() as conn:
        from_store = upgraded.events_of_many(conn, [VM1, VM2])
    histories = {
        resource: lifecycle.build_resource_history(
            resource, [pb.LifecycleEvent.FromString(e) for e in events]
        )
        for resource, events in from_store.items()
    }
    assert histories == lifecycle.build_history([ev for _, ev in old])
    # and the collector goes on from there
    out = Collector(upgraded, Settings(), Clock(NOW)).apply_events([Record(raw) for raw, _ in old])
    assert (out.events, out.known_events) == (0, 3)
    upgraded.close()
