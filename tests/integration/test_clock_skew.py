"""Clock skew end to end: CloudStack events whose stamps contradict their delivery order, read
through the collector's inputs into a store. A START stamped 2 s after the STOP delivered after
it bills nothing and leaves the VM stopped; the delivery order is the source's own (file lines,
Kafka offsets), stored with each event, so a second replica and a replay agree."""

from __future__ import annotations

import subprocess
import sys
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
from kvmeter.proto import pb
from tests.collector_support import ACCT_A, HOUR, T0, VM1, VM2, Clock, events_of, usage_event
from tests.harness.kafka import FAST_GROUP

NOW = T0 + 3 * HOUR
RUNNING_VM = 1
SEC = 1000


def skewed() -> list[tuple[bytes, bytes]]:
    """VM1 ran an hour, then was started and stopped again by two management servers whose
    clocks disagree: the START stamped 2 s after the STOP that was delivered after it. VM2 was
    started and stopped in order (stamps agree), for contrast."""
    return [
        usage_event("VM.START", VM1, ACCT_A, T0),
        usage_event("VM.STOP", VM1, ACCT_A, T0 + HOUR),
        usage_event("VM.START", VM1, ACCT_A, T0 + HOUR + 10 * 60 * SEC + 2 * SEC),  # fast clock
        usage_event("VM.STOP", VM1, ACCT_A, T0 + HOUR + 10 * 60 * SEC),
        usage_event("VM.START", VM2, ACCT_A, T0),
        usage_event("VM.STOP", VM2, ACCT_A, T0 + 30 * 60 * SEC),
    ]


def running_ms(store: Store) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, qty in store.net_usage().items():
        if key.usage_type == RUNNING_VM:
            out[key.resource] = out.get(key.resource, 0) + qty
    return out


EXPECTED = {VM1: HOUR, VM2: 30 * 60 * SEC}  # by stamps alone VM1 would run on from 01:10:02


def test_a_skewed_events_file_through_kvmeter_ingest(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join(value for _, value in skewed()) + b"\n")
    db = f"sqlite:///{tmp_path}/usage.db"
    for _ in range(2):  # a second run (a replay) changes nothing
        subprocess.run(
            [
                sys.executable,
                "-m",
                "kvmeter",
                "ingest",
                "--db",
                db,
                "--events",
                str(events),
                "--now",
                str(NOW),
            ],
            check=True,
            capture_output=True,
        )
    store = Store(db)
    assert running_ms(store) == EXPECTED
    with store.read() as conn:
        stored = [pb.LifecycleEvent.FromString(raw) for raw in events_of(store, conn, VM1)]
    assert sorted((ev.delivery_source, ev.delivery_seq) for ev in stored) == [
        ("events.jsonl", 1),
        ("events.jsonl", 2),
        ("events.jsonl", 3),
        ("events.jsonl", 4),
    ]
    store.close()


@pytest.mark.broker
def test_two_replicas_and_a_replay_agree_on_kafka_offsets(
    kafka_bootstrap: str, unique_topic: Callable[..., str], tmp_path: Path
) -> None:
    """Two replicas read the lifecycle topic (duplicated deliveries included) into one store, then
    a fresh store replays it: the same records everywhere."""
    lifecycle = unique_topic("cloudstack", partitions=2)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for key, value in [*skewed(), *skewed()]:  # every record twice
        producer.produce(lifecycle, key=key, value=value)
    assert producer.flush(30) == 0

    def drain_into(store: Store, replicas: int) -> None:
        feeders = []
        for i in range(replicas):
            metrics = Metrics()
            kafka = KafkaConfig(
                kafka_bootstrap,
                unique_topic("measures"),
                lifecycle,
                f"g-{i}-{lifecycle}",
                3,
                dict(FAST_GROUP),
            )
            feeders.append(
                Feeder(Collector(store, Settings(), Clock(NOW)), [KafkaInput(kafka, metrics)], metrics)
            )
        for feeder in feeders:
            feeder.start()
        for feeder in feeders:
            feeder.catch_up(timeout_s=30)
        for feeder in feeders:
            feeder.collector.tick()
            feeder.close()

    shared = Store(f"sqlite:///{tmp_path}/shared.db")
    shared.migrate()
    drain_into(shared, replicas=2)
    replay = Store(f"sqlite:///{tmp_path}/replay.db")
    replay.migrate()
    drain_into(replay, replicas=1)
    assert running_ms(shared) == EXPECTED
    assert replay.net_usage() == shared.net_usage()
    shared.close()
    replay.close()
