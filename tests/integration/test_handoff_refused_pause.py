"""The hand-off's items the webhook refuses for good, at scale and over time, on both databases
with the relay's real code and a real receiver on loopback: a claim walks the webhook's own index
in its order (never every pending row, never a sort of every refused row), a refused item is
offered again after a growing pause (not POSTed every round, about once a second, forever), is
never dropped, and goes out once the receiver takes it; items refused before migration 28 stay
offered; the pause is set from the collector's TOML."""

from __future__ import annotations

import itertools
import json
import re
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from kvmeter.collector.config_handoff import HandoffConfig
from kvmeter.collector.model import UsageKey
from kvmeter.collector.outbox_relay import HandoffMetrics, Relay
from kvmeter.collector.schema import handoff_outbox
from kvmeter.collector.store import Store, schema_version
from kvmeter.collector.store import outbox as store_outbox
from kvmeter.pipeline.sim.simlibvirt import write_node_xml
from tests.collector_support import HOUR, T0, VM1, wait_for
from tests.handoff_support import pick_plans
from tests.integration.test_handoff_allinone import config_head, start_all_in_one
from tests.integration.test_handoff_edges import Server, answer, filled, outbox
from tests.integration.test_handoff_refusals import key, store_of
from tests.monitoring_support import TOP

S = 1000  # ms


def test_the_webhooks_claim_walks_its_own_index_in_order(store_url: str) -> None:
    """An outbox of 6,000 pending items, 9 in 10 refused by the webhook (the topic has them all):
    both of the webhook's picks (the items never refused, then the refused that are due) read
    ix_handoff_outbox_webhook (SQLite: in its order, no sort). Without it the first walked every pending
    row and the second sorted every refused one: 111-126 ms a claim at 90,000 refused, about
    once a second (README, benchmark 5e)."""
    store = Store(store_url, outbox=True)
    store.migrate()
    rows = [
        {
            "transaction_id": f"tid-{n:06d}",
            "account": f"acct-{n % 50:03d}",
            "item": "{}",
            "created_ms": T0,
            "topic_sent_ms": T0,
            "record": f"rec-{n:06d}",
            "version": 0,
            "webhook_refused_ms": T0 + n if n % 10 else None,
            "webhook_retry_ms": T0 + n if n % 10 else None,
        }
        for n in range(6000)
    ]
    with store.write() as conn:
        for start in range(0, len(rows), 2000):
            conn.execute(sa.insert(handoff_outbox), rows[start : start + 2000])
    if store.is_postgres:
        with store.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(sa.text("ANALYZE handoff_outbox"))
    try:
        plans = pick_plans(store, store_outbox.WEBHOOK, 200, T0 + 10**6)
    finally:
        store.close()
    assert len(plans) == 2, plans
    for plan in plans:
        text = "\n".join(plan)
        assert "ix_handoff_outbox_webhook" in text, f"a webhook pick not on its index:\n{text}"
        # SQLite plans without statistics, as in production: in the index's order, no sort (on
        # PostgreSQL, a table this small may be read by a bitmap scan of the index, then sorted)
        assert "TEMP B-TREE" not in text, f"a webhook pick sorts:\n{text}"


class Receiver:
    """A receiver that answers 422 to the ids in `refused` and 200 to the others, noting when
    (the relay's clock) each id was POSTed."""

    def __init__(self, clock: list[int], refused: set[str]):
        self.posts: list[tuple[str, int]] = []

        def handle(h: Any, body: bytes) -> None:
            tid = json.loads(body)["transaction_id"]
            self.posts.append((tid, clock[0]))
            answer(h, 422 if tid in refused else 200)

        self.server = Server(handle)

    def times(self, tid: str) -> list[int]:
        return [at for posted, at in self.posts if posted == tid]


def test_a_refused_item_is_offered_again_after_a_growing_pause_and_never_dropped(store_url: str) -> None:
    """The receiver refuses item A for good (422): under the default settings A is POSTed again
    60 s after the refusal, then 120 s after the next, then 240 s, 480 s (doubling, up to an
    hour), not at every round (86,400 POSTs a day of an item the receiver already refused);
    newer items are delivered at once meanwhile; A stays pending and counted as refused, and
    once the receiver takes it, it is delivered at its next offer, once. Rounds run every 5 s
    of the relay's clock."""
    store = store_of(store_url, [key(0), key(1)])
    a, b = (r["transaction_id"] for r in outbox(store))
    clock = [T0]
    refused = {a}
    receiver = Receiver(clock, refused)
    registry = CollectorRegistry()
    cfg = HandoffConfig(  # the default pauses
        webhook_url=receiver.server.url, retry_attempts=2, retry_initial_s=0.01, retry_max_s=0.02, timeout_s=1
    )
    relay = Relay(store, cfg, HandoffMetrics(registry, store), clock=lambda: clock[0])
    try:
        for second in range(0, 905, 5):
            clock[0] = T0 + second * S
            if second == 100:  # a newer item meanwhile: it does not wait for A's pause
                late = UsageKey("acct-late", 4, VM1, "", "public", T0 + HOUR, T0 + 2 * HOUR)
                with store.write() as conn:
                    store.add_bytes(conn, {late: 5}, {}, 0, 3)
                with store.write() as conn:
                    store.finalize(conn, T0 + 2 * HOUR, 4)
            if second == 430:
                assert store.outbox_refused() == 1
                assert registry.get_sample_value("kvmeter_handoff_refused_items") == 1
                refused.clear()  # the receiver is fixed: A goes out at its next offer
            relay.round()
            if second == 100:
                c = next(r for r in outbox(store) if r["transaction_id"] not in (a, b))
                assert c["sent_ms"] is not None, "a newer item waited for the refused one's pause"
        assert [(at - T0) // S for at in receiver.times(a)] == [0, 60, 180, 420, 900]
        assert receiver.times(b) == [T0]
        assert store.outbox_stats() == (0, None)
        assert registry.get_sample_value("kvmeter_handoff_refused_items") == 0
    finally:
        receiver.server.close()
        store.close()


def readme_offer_now() -> str:
    """The README's statement that ends the refused items' pauses (its hand-off section), as an
    operator would paste it."""
    text = " ".join((TOP / "README.md").read_text().split())
    found = re.search(r"`(UPDATE handoff_outbox SET webhook_retry_ms[^`]*)`", text)
    assert found, "the README's hand-off section names no statement to offer refused items at once"
    return found.group(1)


def test_the_readmes_statement_offers_the_refused_items_at_the_next_round(store_url: str) -> None:
    """The operator fixed the receiver and does not want to wait up to an hour for the refused
    items' next offer: the README's UPDATE, run on the live store, makes the next round offer
    them (and deliver them, once), and nothing else changes: a refused item again after it
    waits the first pause, not the longest."""
    store = store_of(store_url, [key(0), key(1)])
    a, b = (r["transaction_id"] for r in outbox(store))
    clock = [T0]
    refused = {a, b}
    receiver = Receiver(clock, refused)
    cfg = HandoffConfig(webhook_url=receiver.server.url, retry_attempts=1, timeout_s=1)
    relay = Relay(store, cfg, HandoffMetrics(CollectorRegistry(), store), clock=lambda: clock[0])
    try:
        for second in (0, 60, 180):  # refused three times: a pause of 240 s now
            clock[0] = T0 + second * S
            relay.round()
        refused.discard(a)  # fixed for A; B is still refused
        clock[0] = T0 + 200 * S
        assert relay.round() == (0, True), "offered before its pause is over"
        with store.write() as conn:
            conn.execute(sa.text(readme_offer_now()))
        relay.round()
        assert receiver.times(a)[-1] == T0 + 200 * S
        assert [r["transaction_id"] for r in outbox(store) if r["sent_ms"] is None] == [b]
        clock[0] = T0 + 259 * S
        relay.round()
        clock[0] = T0 + 260 * S
        relay.round()
        assert [(at - T0) // S for at in receiver.times(b)] == [0, 60, 180, 200, 260]
        assert receiver.times(a).count(T0 + 200 * S) == 1
    finally:
        receiver.server.close()
        store.close()


def test_items_refused_before_migration_28_are_still_offered(store_url: str) -> None:
    """A store upgraded with an item the webhook refused before migration 28 (no retry time),
    and one refused meanwhile by a replica not yet upgraded (its refusal writes none): both are
    still offered to the webhook (a row no phase of the claim reads would never be billed), the
    one refused before the migration after the items never refused."""
    store = store_of(store_url, [key(0), key(1), key(2)])
    ids = [r["id"] for r in outbox(store)]
    ob = handoff_outbox.c
    with store.write() as conn:  # what a store before migration 28 has: item 0 refused
        conn.execute(sa.text("DROP INDEX ix_handoff_outbox_webhook"))
        conn.execute(sa.text("ALTER TABLE handoff_outbox DROP COLUMN webhook_retry_ms"))
        conn.execute(sa.delete(schema_version).where(schema_version.c.version >= 28))
        conn.execute(
            sa.text("UPDATE handoff_outbox SET webhook_refused_ms = :at WHERE id = :id"),
            {"at": T0, "id": ids[0]},
        )
    store.close()
    upgraded = Store(store_url, outbox=True)
    try:
        upgraded.migrate()
        with upgraded.write() as conn:  # an older replica refuses item 1 after the migration
            conn.execute(sa.update(handoff_outbox).where(ob.id == ids[1]).values(webhook_refused_ms=T0 + 1))
        first = upgraded.claim_outbox(2, T0 + 2, 1000, ["webhook"])
        assert sorted(r.id for r in first) == ids[1:], "the items never refused (as far as 28 knows) first"
        then = upgraded.claim_outbox(2, T0 + 3, 1000, ["webhook"])
        assert [r.id for r in then] == ids[:1], "the item refused before migration 28 is never offered"
    finally:
        upgraded.close()


def test_the_collector_from_toml_pauses_a_refused_item_by_its_settings(tmp_path: Path) -> None:
    """`kvmeter run --all-in-one` from a TOML file whose [handoff] sets refused_retry_initial_seconds
    0.3 and refused_retry_max_seconds 0.6, its webhook refusing one of three items (422): the
    others are delivered, the refused one is POSTed again no sooner than 0.3 s after its first
    refusal, then no sooner than 0.6 s after the next (with poll_seconds 0.05 it was POSTed
    every round), and is delivered once the receiver takes it."""
    db = f"sqlite:///{tmp_path}/usage.db"
    filled(tmp_path, 3).close()
    with sqlite3.connect(tmp_path / "usage.db") as conn:
        ids = [r[0] for r in conn.execute("SELECT transaction_id FROM handoff_outbox ORDER BY id")]
    bad = ids[0]
    refused, posts = {bad}, []

    def handle(h: Any, body: bytes) -> None:
        tid = json.loads(body)["transaction_id"]
        posts.append((tid, time.monotonic()))
        answer(h, 422 if tid in refused else 200)

    server = Server(handle)
    config = tmp_path / "allinone.toml"
    config.write_text(
        config_head(tmp_path, write_node_xml(tmp_path / "node.xml", []), db)
        + f"""
[handoff]
webhook_url = "{server.url}"
retry_attempts = 2
retry_initial_seconds = 0.05
retry_max_seconds = 0.1
refused_retry_initial_seconds = 0.3
refused_retry_max_seconds = 0.6
poll_seconds = 0.05
"""
    )
    log = tmp_path / "allinone.log"
    proc = start_all_in_one(config, log)
    try:
        wait_for(
            lambda: [t for t, _ in posts].count(bad) >= 3, 15, "3 offers of the refused item", log.read_text
        )
        refused.clear()
        wait_for(lambda: not _pending(tmp_path), 10, "the refused item delivered", log.read_text)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        server.close()
    assert code == 0, log.read_text()[-3000:]
    times = [at for tid, at in posts if tid == bad]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert gaps[0] >= 0.3, f"offered again {gaps[0]:.2f} s after its first refusal"
    assert gaps[1] >= 0.6, f"offered again after {gaps}: the pause did not grow"
    assert sorted({tid for tid, _ in posts}) == sorted(ids)
    assert all([t for t, _ in posts].count(i) == 1 for i in ids[1:])


def _pending(tmp_path: Path) -> list[str]:
    with sqlite3.connect(tmp_path / "usage.db") as conn:
        return [r[0] for r in conn.execute("SELECT transaction_id FROM handoff_outbox WHERE sent_ms IS NULL")]
