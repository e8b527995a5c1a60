"""The live consumer's view of a partition's end, against the real broker: the lifecycle catch-up
reads the whole topic and the lag gauges reach the true end, also when the records arrived in
one large producer batch (Tansu answers ListOffsets with the last batch's first offset + 1, so
an end taken from ListOffsets stops short; the high watermark of fetch responses is right on
Tansu and on Kafka)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Producer

from kvmeter.collector.config import KafkaConfig
from kvmeter.collector.feed import Feeder
from kvmeter.collector.input_kafka import KafkaInput
from kvmeter.collector.metrics import Metrics
from kvmeter.collector.model import Settings
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store
from kvmeter.pipeline.sim.simevents import EventBus
from tests.harness.kafka import FAST_GROUP

pytestmark = pytest.mark.broker
EVENTS = 60
T0 = 1_715_680_800_000  # 2024-05-14T10:00:00Z


def produce_one_batch(bootstrap: str, topic: str, values: list[bytes]) -> None:
    """All values in as few producer batches as possible (one, at these sizes)."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 500, "batch.num.messages": 10_000})
    for value in values:
        producer.produce(topic, value=value, partition=0)
    assert producer.flush(30) == 0


def vm_starts(n: int) -> list[bytes]:
    bus = EventBus()
    return [bus.vm("VM.START", f"vm-{i:04d}", "acct-a", T0 + i * 1000)[1] for i in range(n)]


def consumer(bootstrap: str, measures: str, lifecycle: str, tmp_path: Path) -> Feeder:
    store = Store(f"sqlite:///{tmp_path}/usage.db")
    store.migrate()
    collector = Collector(store, Settings(), clock=lambda: T0 + 3_600_000)
    kafka = KafkaConfig(
        bootstrap, measures, lifecycle, f"g-{measures}", batch_size=5, options=dict(FAST_GROUP)
    )
    metrics = Metrics()
    return Feeder(collector, [KafkaInput(kafka, metrics)], metrics, poll_timeout=0.2)


def lag(live: Feeder, topic: str) -> float | None:
    return live.metrics.registry.get_sample_value("kvmeter_consumer_lag", {"topic": topic, "partition": "0"})


def test_catch_up_reads_the_whole_lifecycle_topic(
    kafka_bootstrap: str, unique_topic: Callable[..., str], tmp_path: Path
) -> None:
    measures, lifecycle = unique_topic("measures"), unique_topic("cloudstack")
    produce_one_batch(kafka_bootstrap, lifecycle, vm_starts(EVENTS))
    live = consumer(kafka_bootstrap, measures, lifecycle, tmp_path)
    try:
        live.start()
        live.catch_up(timeout_s=30)
        # every event applied before the first measure is read: 12 chunks of 5
        assert live.totals.events == EVENTS
        assert sorted(live.collector.histories) == [f"vm-{i:04d}" for i in range(EVENTS)]
    finally:
        live.close()


def test_catch_up_of_an_empty_topic_returns_at_once(
    kafka_bootstrap: str, unique_topic: Callable[..., str], tmp_path: Path
) -> None:
    measures, lifecycle = unique_topic("measures"), unique_topic("cloudstack")
    live = consumer(kafka_bootstrap, measures, lifecycle, tmp_path)
    try:
        live.start()
        t0 = time.monotonic()
        live.catch_up(timeout_s=30)
        assert time.monotonic() - t0 < 15
        assert live.totals.events == 0
    finally:
        live.close()


def test_lag_gauges_count_down_to_the_true_end(
    kafka_bootstrap: str, unique_topic: Callable[..., str], tmp_path: Path
) -> None:
    measures, lifecycle = unique_topic("measures"), unique_topic("cloudstack")
    produce_one_batch(kafka_bootstrap, lifecycle, vm_starts(EVENTS))
    # measure records the service dead-letters (not protobuf): only their count matters here
    produce_one_batch(kafka_bootstrap, measures, [json.dumps({"n": i}).encode() for i in range(40)])
    live = consumer(kafka_bootstrap, measures, lifecycle, tmp_path)
    try:
        live.start()
        kafka = live.inputs[0]
        assert isinstance(kafka, KafkaInput)
        deadline = time.monotonic() + 30
        while live.totals.events == 0 and time.monotonic() < deadline:
            for delivery in kafka.poll_lifecycle(0.2):
                live.apply(delivery)
        kafka.update_lag()
        assert lag(live, lifecycle) == EVENTS - live.totals.events  # one chunk read: 55 behind
        seen = 0
        while seen < 40 and time.monotonic() < deadline:  # the group joins, then chunks of 5
            before = len(live.collector.store.dead_letter_rows())
            for delivery in kafka.poll_measures(0.2):
                live.apply(delivery)
            seen = len(live.collector.store.dead_letter_rows())
            if seen > before and seen < 40:
                kafka.update_lag()
                assert lag(live, measures) == 40 - seen
        assert seen == 40
        live.catch_up(timeout_s=30)
        kafka.update_lag()
        assert lag(live, measures) == 0
        assert lag(live, lifecycle) == 0
        assert live.totals.events == EVENTS
    finally:
        live.close()
