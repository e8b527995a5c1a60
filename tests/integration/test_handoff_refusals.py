"""The hand-off's webhook and items it refuses for good (a 4xx about the item, such as 422), on
both databases, with the relay's real code and a real receiver on loopback: refused items never
keep newer ones waiting, a record's versions still reach the receiver in order, and the refused
items stay pending, visible and offered again (a receiver fixed meanwhile gets them)."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from kvmeter.collector.model import UsageKey
from kvmeter.collector.outbox_relay import HandoffMetrics, Relay
from kvmeter.collector.store import Store, schema_version
from tests.collector_support import HOUR, T0, VM1
from tests.integration.test_handoff_edges import FAST, Server, answer, outbox


def store_of(store_url: str, keys: list[UsageKey], late: dict[UsageKey, int] | None = None) -> Store:
    """A store whose outbox holds one record item per key (in key order), then an adjustment
    (version 1) of each key in `late`."""
    store = Store(store_url, outbox=True)
    store.migrate()
    with store.write() as conn:
        store.add_bytes(conn, {k: 1000 + i for i, k in enumerate(keys)}, {}, 0, 1)
    with store.write() as conn:
        store.finalize(conn, T0 + HOUR, 2)
    if late:
        with store.write() as conn:
            store.add_bytes(conn, late, {}, T0 + HOUR, 3)
    return store


def key(n: int) -> UsageKey:
    return UsageKey(f"acct-{n:03d}", 4, VM1, "", "public", T0, T0 + HOUR)


def refusing(refused: set[str], posted: list[str]) -> Any:
    """A receiver's handler: 422 to the ids in `refused` (read at each POST), 200 to the rest."""

    def handle(h: Any, body: bytes) -> None:
        tid = json.loads(body)["transaction_id"]
        posted.append(tid)
        answer(h, 422 if tid in refused else 200)

    return handle


def refused_gauge(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value("kvmeter_handoff_refused_items")


def test_a_full_batch_of_refused_items_does_not_block_newer_ones(store_url: str) -> None:
    """The receiver refuses the batch_size oldest items (422): the newer ones are still delivered
    (every round claimed the oldest again first, so a full batch of refused items held every
    newer billable item back for good, billing stopped); the refused ones stay pending, are
    counted in kvmeter_handoff_refused_items and are delivered once the receiver takes them."""
    store = store_of(store_url, [key(n) for n in range(6)])
    ids = [r["transaction_id"] for r in outbox(store)]
    refused, posted = set(ids[:3]), []  # batch_size 3: a whole claim of refused items
    server = Server(refusing(refused, posted))
    registry = CollectorRegistry()
    try:
        cfg = replace(FAST, webhook_url=server.url, batch_size=3)
        relay = Relay(store, cfg, HandoffMetrics(registry, store))
        for _ in range(3):
            relay.round()
        sent = {r["transaction_id"] for r in outbox(store) if r["sent_ms"] is not None}
        newer = set(ids[3:])
        assert sent == newer, f"{len(sent & newer)} of the 3 newer items delivered after 3 rounds"
        assert store.outbox_stats()[0] == 3
        assert refused_gauge(registry) == 3
        refused.clear()  # the receiver is fixed: the refused items go out in the next rounds
        for _ in range(2):
            relay.round()
        assert store.outbox_stats() == (0, None)
        assert refused_gauge(registry) == 0
    finally:
        server.close()
        store.close()


def test_a_refused_version_holds_back_only_its_own_records_later_versions(store_url: str) -> None:
    """Record A's version 0 is refused (422); its adjustment, version 1, is never POSTed before
    version 0 was taken (it was POSTed right after the refusal, in the same round: the receiver
    got an adjustment of a record it never had), while another record's items go on; once the
    receiver takes version 0, version 1 follows it."""
    a, b = key(0), key(1)
    store = store_of(store_url, [a, b], late={a: 7, b: 9})
    items = [json.loads(r["item"]) for r in outbox(store)]
    by = {(i["account"], i["version"]): i["transaction_id"] for i in items}
    a0, a1, b0, b1 = by[a.account, 0], by[a.account, 1], by[b.account, 0], by[b.account, 1]
    refused, posted = {a0}, []
    server = Server(refusing(refused, posted))
    try:
        cfg = replace(FAST, webhook_url=server.url)
        relay = Relay(store, cfg, HandoffMetrics(CollectorRegistry(), store))
        for _ in range(3):
            relay.round()
        assert a1 not in posted, f"A's version 1 was POSTed while its version 0 was refused: {posted}"
        assert posted.index(b0) < posted.index(b1), "B's versions out of order"
        refused.clear()
        for _ in range(3):
            relay.round()
        assert store.outbox_stats() == (0, None)
    finally:
        server.close()
        store.close()
    assert posted.index(a0) < posted.index(a1), "A's version 1 reached the receiver before its version 0"
    assert posted.count(a1) == 1


def test_items_pending_before_migration_27_keep_their_records_order(store_url: str) -> None:
    """A store upgraded with items pending (made before migration 27, so without their record
    and version): the migration reads them from each item, so a record's adjustment pending
    then still waits for its version 0 (the sink is offered version 0 alone)."""
    a = key(0)
    store = store_of(store_url, [a], late={a: 7})
    with store.write() as conn:  # what a store before migration 27 has
        conn.execute(sa.text("DROP INDEX ix_handoff_outbox_record"))
        for column in ("record", "version", "webhook_refused_ms"):
            conn.execute(sa.text(f"ALTER TABLE handoff_outbox DROP COLUMN {column}"))
        conn.execute(sa.delete(schema_version).where(schema_version.c.version >= 27))
    store.close()
    upgraded = Store(store_url, outbox=True)
    try:
        upgraded.migrate()
        claimed = upgraded.claim_outbox(10, 1, 1000, ["webhook"])
        assert [json.loads(r.item)["version"] for r in claimed] == [0]
    finally:
        upgraded.close()
