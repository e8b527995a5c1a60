"""The relay against real receivers: a local HTTP server that fails twice before it
acknowledges, a real broker, two relays on one store. Every transaction id arrives, and a
receiver deduplicating by id counts every record exactly once."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from prometheus_client import CollectorRegistry

from kvmeter.collector.config_handoff import HandoffConfig
from kvmeter.collector.model import UsageKey
from kvmeter.collector.outbox_relay import HandoffMetrics, Relay
from kvmeter.collector.store import Store
from tests.collector_support import HOUR, T0, VM1, wait_for
from tests.handoff_support import Receiver, net_per_key, topic_reader

FAST = HandoffConfig(retry_attempts=5, retry_initial_s=0.01, retry_max_s=0.05, timeout_s=5, batch_size=7)


def fill(store_url: str) -> Store:
    """Records of three accounts over four windows made final, then late bytes adjusting some."""
    store = Store(store_url, outbox=True)
    store.migrate()
    keys = [
        UsageKey(f"acct-{a}", 4, VM1, "", "public", T0 + w * HOUR, T0 + (w + 1) * HOUR)
        for a in range(3)
        for w in range(4)
    ]
    with store.write() as conn:
        store.add_bytes(conn, {k: 1000 + i for i, k in enumerate(keys)}, {}, 0, 1)
    with store.write() as conn:
        store.finalize(conn, T0 + 4 * HOUR, 2)
    for now in (3, 4):
        with store.write() as conn:
            store.add_bytes(conn, {k: now for k in keys[::5]}, {}, T0 + 4 * HOUR, now)
    return store


def outbox_ids(store: Store) -> set[str]:
    from kvmeter.collector.schema import handoff_outbox

    with store.read() as conn:
        return {
            row[0]
            for row in conn.execute(
                handoff_outbox.select().with_only_columns(handoff_outbox.c.transaction_id)
            )
        }


def final_net(store: Store) -> dict[tuple[object, ...], int]:
    return {tuple(r.key): r.quantity for r in store.usage(0, 2**62) if r.final and r.quantity}


def drain(relay: Relay, rounds: int = 50) -> None:
    for _ in range(rounds):
        claimed, _ok = relay.round()
        if not claimed:
            return
    raise AssertionError("the outbox did not drain")


def relay_of(store: Store, cfg: HandoffConfig) -> tuple[Relay, HandoffMetrics]:
    metrics = HandoffMetrics(CollectorRegistry(), store)
    return Relay(store, cfg, metrics), metrics


def test_a_webhook_that_fails_twice_then_acknowledges_gets_every_item(store_url: str) -> None:
    store = fill(store_url)
    expected = outbox_ids(store)
    assert len(expected) == 12 + 2 * 3  # 12 records, 3 keys adjusted twice
    cfg = replace(
        FAST,
        webhook_url="",
        webhook_headers={"Authorization": "Bearer billing-token"},
        webhook_secret="s3cret",
    )
    with Receiver(fail_first=2, secret="s3cret") as receiver:
        relay, metrics = relay_of(store, replace(cfg, webhook_url=receiver.url))
        drain(relay)
        counts = Counter(receiver.ids())
        assert set(counts) == expected
        assert set(counts.values()) == {3}  # two failures, then the acknowledgement
        assert receiver.duplicates() == 2 * len(expected)
        items = receiver.deduplicated()
        assert all(item["transaction_id"] == tid for tid, item in items.items())
        assert net_per_key(items) == final_net(store)  # every record exactly once, adjustments too
        assert {h["authorization"] for _, _, h in receiver.posts} == {"Bearer billing-token"}
    assert store.outbox_stats() == (0, None)
    sample = metrics.registry.get_sample_value
    assert sample("kvmeter_handoff_delivery_errors_total", {"sink": "webhook"}) == 2 * len(expected)
    assert sample("kvmeter_handoff_delivered_total", {"sink": "webhook"}) == len(expected)
    assert sample("kvmeter_handoff_outbox_depth") == 0
    store.close()


def test_when_the_attempts_run_out_the_item_waits_for_the_next_round(store_url: str) -> None:
    store = fill(store_url)
    total = len(outbox_ids(store))
    with Receiver(fail_first=3) as receiver:
        relay, _ = relay_of(store, replace(FAST, retry_attempts=2, webhook_url=receiver.url))
        claimed, ok = relay.round()
        assert (claimed, ok) == (7, False)
        assert receiver.ids() == [receiver.ids()[0]] * 2  # the round stopped at the first item
        depth, oldest = store.outbox_stats()
        assert (depth, oldest) == (total, 2)  # nothing lost, nothing marked
        sample = relay.metrics.registry.get_sample_value
        assert sample("kvmeter_handoff_outbox_depth") == total
        assert sample("kvmeter_handoff_oldest_pending_seconds") > 0
        drain(relay)
        assert set(receiver.ids()) == outbox_ids(store)
        assert store.outbox_stats() == (0, None)
    store.close()


def test_the_topic_gets_every_item_keyed_by_account(
    tmp_path: Path, kafka_bootstrap: str, unique_topic: Callable[..., str]
) -> None:
    # One store: the topic sink is the same whatever the store (the relay's leases and rounds
    # run on both in the other tests here), and a round on the topic costs half a minute.
    store = fill(f"sqlite:///{tmp_path}/usage.db")
    topic = unique_topic("billable", partitions=3)
    relay, metrics = relay_of(store, replace(FAST, topic=topic, bootstrap=kafka_bootstrap))
    drain(relay)
    assert store.outbox_stats() == (0, None)
    sample = metrics.registry.get_sample_value
    assert sample("kvmeter_handoff_delivered_total", {"sink": "topic"}) == len(outbox_ids(store))
    with topic_reader(kafka_bootstrap, topic) as reader:
        wait_for(
            lambda: reader.poll() or set(reader.deduplicated()) == outbox_ids(store),
            60,
            "every item on the topic",
        )
        assert all(
            key == item["account"] and tid == item["transaction_id"] for key, tid, item in reader.records
        )
        assert net_per_key(reader.deduplicated()) == final_net(store)
    relay.close()
    store.close()


def test_two_relays_on_one_store_send_each_item_once(store_url: str) -> None:
    store = fill(store_url)
    other = Store(store_url, outbox=True)
    with Receiver() as receiver:
        cfg = replace(FAST, batch_size=2, webhook_url=receiver.url)
        relays = [relay_of(s, cfg)[0] for s in (store, other)]
        errors: list[BaseException] = []

        def run(relay: Relay) -> None:
            try:
                drain(relay)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(r,)) for r in relays]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        assert Counter(receiver.ids()) == dict.fromkeys(outbox_ids(store), 1)
    assert store.outbox_stats() == (0, None)
    other.close()
    store.close()
