"""Live consumption from a real Kafka-protocol broker: measures through a consumer group,
lifecycle read whole, poison dead-lettered, duplicates changing nothing, offsets committed."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from kvmeter.collector.config import KafkaConfig
from kvmeter.collector.feed import Feeder
from kvmeter.collector.input_kafka import KafkaInput
from kvmeter.collector.metrics import Metrics
from kvmeter.collector.model import Settings
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store
from tests.collector_support import (
    HOUR,
    T0,
    Clock,
    M,
    Stream,
    expected_usage,
    net_by_short_key,
    scenario,
    wait_for,
)
from tests.harness.kafka import FAST_GROUP

pytestmark = pytest.mark.broker
NOW = T0 + 5 * HOUR


def produce(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for key, value in records:
        producer.produce(topic, value=value, key=key)
    assert producer.flush(30) == 0


class Running:
    """The collector's loop over a Kafka input, on its own thread."""

    def __init__(self, store: Store, kafka: KafkaConfig, clock: Clock, settings: Settings | None = None):
        self.collector = Collector(store, settings or Settings(), clock)
        metrics = Metrics()
        self.kafka = KafkaInput(kafka, metrics)
        self.live = Feeder(self.collector, [self.kafka], metrics, tick_seconds=0.5, poll_timeout=0.2)
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.live.run()
        except BaseException as exc:  # pragma: no cover - reported by stop()
            self.errors.append(exc)

    def stop(self) -> None:
        self.live.stop()
        self.thread.join(30)
        assert not self.thread.is_alive()
        assert not self.errors


def kafka_config(bootstrap: str, measures: str, lifecycle: str, group: str) -> KafkaConfig:
    return KafkaConfig(bootstrap, measures, lifecycle, group, batch_size=3, options=dict(FAST_GROUP))


def test_live_consumption_bills_once_and_dead_letters_poison(
    kafka_bootstrap: str, unique_topic: Callable[..., str], tmp_path: Path
) -> None:
    measures, lifecycle = unique_topic("measures", partitions=2), unique_topic("cloudstack")
    group = f"g-{measures}"
    sc = scenario()
    produce(kafka_bootstrap, lifecycle, [*sc.events, (None, b"not json at all")])
    hosts = [b"h1", b"h1", b"h2", b"h2"]
    produce(kafka_bootstrap, measures, [*zip(hosts, sc.batches, strict=True), (b"h3", b"\xff\xfepoison")])

    store = Store(f"sqlite:///{tmp_path}/usage.db")
    store.migrate()
    clock = Clock(NOW)
    run = Running(store, kafka_config(kafka_bootstrap, measures, lifecycle, group), clock)
    try:
        wait_for(lambda: store.marks() == {"stream-h1": 2, "stream-h2": 2}, 60, "all batches applied")
        wait_for(lambda: len(store.dead_letter_rows()) == 2, 30, "both poison messages dead-lettered")
        wait_for(lambda: net_by_short_key(store.net_usage()) == expected_usage(NOW), 30, "the expected usage")
        # Every batch again (a producer retry, an agent spool replay): nothing changes.
        produce(kafka_bootstrap, measures, list(zip(hosts, sc.batches, strict=True)))
        wait_for(lambda: run.live.totals.duplicates >= len(sc.batches), 60, "the duplicates consumed")
        time.sleep(1.0)  # a tick or two more
        assert net_by_short_key(store.net_usage()) == expected_usage(NOW)
    finally:
        run.stop()
    letters = {(r["source"], r["reason"], bytes(r["raw"])) for r in store.dead_letter_rows()}
    assert letters == {
        ("lifecycle", "malformed_json", b"not json at all"),
        ("measures", "malformed_protobuf", b"\xff\xfepoison"),
    }
    assert [m.bytes for m in store.parked_rows()] == [sc.parked_bytes]
    # Offsets were committed for everything applied (the group resumes after it).
    probe = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group, **FAST_GROUP})
    committed = probe.committed([TopicPartition(measures, 0), TopicPartition(measures, 1)], timeout=10)
    probe.close()
    produced = 2 * len(sc.batches) + 1
    assert sum(max(tp.offset, 0) for tp in committed) == produced
    store.close()


def test_a_restarted_collector_resumes_without_billing_twice(
    kafka_bootstrap: str, unique_topic: Callable[..., str], tmp_path: Path
) -> None:
    measures, lifecycle = unique_topic("measures"), unique_topic("cloudstack")
    sc = scenario()
    produce(kafka_bootstrap, lifecycle, sc.events)
    produce(kafka_bootstrap, measures, [(b"h", b) for b in sc.batches[:2]])
    store = Store(f"sqlite:///{tmp_path}/usage.db")
    store.migrate()
    kafka = kafka_config(kafka_bootstrap, measures, lifecycle, f"g-{measures}")
    first = Running(store, kafka, Clock(NOW))
    wait_for(lambda: store.marks() == {"stream-h1": 2}, 60, "the first half applied")
    first.stop()
    produce(kafka_bootstrap, measures, [(b"h", b) for b in sc.batches[2:]])
    second = Running(store, kafka, Clock(NOW))
    try:
        wait_for(lambda: store.marks().get("stream-h2") == 2, 60, "the second half applied")
        wait_for(lambda: net_by_short_key(store.net_usage()) == expected_usage(NOW), 30, "the expected usage")
        # The lifecycle topic was read whole again by the new incarnation: all known, none new.
        assert second.live.totals.events == 0
        assert second.live.totals.known_events == len(sc.events)
        assert second.live.totals.duplicates == 0  # it resumed after the committed offsets
    finally:
        second.stop()
    store.close()


@pytest.mark.pg
def test_two_replicas_share_the_partitions_and_one_postgresql(
    kafka_bootstrap: str, unique_topic: Callable[..., str], pg_database: str
) -> None:
    measures, lifecycle = unique_topic("measures", partitions=4), unique_topic("cloudstack")
    sc = scenario()
    produce(kafka_bootstrap, lifecycle, sc.events)
    streams = [Stream(f"stream-{i}", f"h{i}") for i in range(8)]
    records = []
    for i in range(8 * 15):
        stream = streams[i % 8]
        records.append(
            (stream.host_id.encode(), stream.batch([M(T0 + i * 1000, T0 + i * 1000 + 500, 1000 + i)]))
        )
    produce(kafka_bootstrap, measures, records)
    kafka = kafka_config(kafka_bootstrap, measures, lifecycle, f"g-{measures}")
    stores = [Store(pg_database) for _ in range(2)]
    stores[0].migrate()
    replicas = [Running(s, kafka, Clock(NOW)) for s in stores]
    try:
        wait_for(lambda: sum(stores[0].marks().values()) == len(records), 90, "every batch applied")
        wait_for(lambda: all(r.kafka.assigned for r in replicas), 30, "both replicas owning partitions")
        assert set.union(*(r.kafka.assigned for r in replicas)) == {0, 1, 2, 3}
        assert not set.intersection(*(r.kafka.assigned for r in replicas))
    finally:
        for r in replicas:
            r.stop()
    billed = {k: v for k, v in stores[0].net_usage().items() if k.usage_type == 4}
    assert sum(billed.values()) == sum(1000 + i for i in range(len(records)))
    applied = [r.live.totals.batches for r in replicas]
    assert sum(applied) == len(records)  # each batch applied by exactly one replica
    for s in stores:
        s.close()
