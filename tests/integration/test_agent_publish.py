"""The agent's publisher against a real Kafka-protocol broker: publish from the spool, consume,
decode; and a broker that is not there yet: the spool holds everything, then drains in order."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from kvmeter.agent.publish import Publisher
from kvmeter.agent.spool import Spool
from kvmeter.proto import SCHEMA_VERSION, pb
from tests.harness.kafka import Broker, create_topic
from tests.harness.ports import free_port

pytestmark = pytest.mark.broker


def batch(seq: int, stream: str = "stream-a") -> pb.MeasureBatch:
    b = pb.MeasureBatch(schema=SCHEMA_VERSION, host_id="kvm-07", boot_id="boot", stream_id=stream, seq=seq)
    b.measures.add(header=SCHEMA_VERSION, saddr=0, bytes=1000 + seq, start=seq * 1000, end=seq * 1000 + 1000)
    return b


def consume(
    bootstrap: str, topic: str, count: int, timeout: float = 30.0
) -> list[tuple[bytes, pb.MeasureBatch]]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"g-{uuid.uuid4().hex}"})
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    got: list[tuple[bytes, pb.MeasureBatch]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < count and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error():
                got.append((msg.key(), pb.MeasureBatch.FromString(msg.value())))
    finally:
        consumer.close()
    return got


def test_spooled_batches_reach_the_broker_in_order_and_ack_the_spool(
    kafka_bootstrap: str, unique_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic = unique_topic("measures")
    spool = Spool(tmp_path)
    publisher = Publisher(spool, bootstrap=kafka_bootstrap, topic=topic, key="kvm-07")
    sent = [batch(seq) for seq in range(1, 21)]
    for b in sent:
        spool.append(b.stream_id, b.seq, b.SerializeToString(), {"seq": b.seq}, b.seq)
    assert publisher.flush(30), f"not delivered: {publisher.last_error}"
    assert spool.pending() == []
    spool.close()
    assert Spool(tmp_path).pending() == []  # the ack position survived
    got = consume(kafka_bootstrap, topic, 20)
    assert [key for key, _ in got] == [b"kvm-07"] * 20
    assert [b for _, b in got] == sent


def test_broker_away_then_back_drains_everything_in_order(tmp_path: Path) -> None:
    port = free_port("127.0.0.1")
    bootstrap = f"127.0.0.1:{port}"
    topic = f"measures-{uuid.uuid4().hex[:8]}"
    spool = Spool(tmp_path)
    publisher = Publisher(spool, bootstrap=bootstrap, topic=topic, key="kvm-07")
    sent = []
    for seq in range(1, 6):  # polls while nothing listens on the bootstrap port
        b = batch(seq)
        sent.append(b)
        spool.append(b.stream_id, b.seq, b.SerializeToString(), {}, seq)
        publisher.service(0.3)
    assert [f.seq for f in spool.pending()] == [1, 2, 3, 4, 5]
    assert publisher.errors > 0  # the client's "broker down" errors are seen (and counted)
    broker = Broker(port=port, log_dir=tmp_path).start()
    try:
        try:
            create_topic(bootstrap, topic)
        except KafkaException as exc:  # the producer's metadata request may have auto-created it
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
        for seq in range(6, 9):
            b = batch(seq)
            sent.append(b)
            spool.append(b.stream_id, b.seq, b.SerializeToString(), {}, seq)
        assert publisher.flush(60), f"not delivered: {publisher.last_error}"
        assert spool.pending() == []
        got = consume(bootstrap, topic, len(sent))
    finally:
        spool.close()
        broker.stop()
    seqs = [b.seq for _, b in got]
    assert sorted(set(seqs)) == list(range(1, 9))  # every batch arrived
    assert seqs == sorted(seqs)  # in order (a re-send keeps its original seq)


def test_the_topics_size_limit_is_read_from_the_broker(kafka_bootstrap: str, tmp_path: Path) -> None:
    from kvmeter.agent.kafka_client import topic_max_message_bytes

    topic = f"limited-{uuid.uuid4().hex[:8]}"
    create_topic(kafka_bootstrap, topic, config={"max.message.bytes": "65536"})
    assert topic_max_message_bytes(kafka_bootstrap, topic) == 65536
    started = time.monotonic()
    assert topic_max_message_bytes(f"127.0.0.1:{free_port('127.0.0.1')}", topic, timeout=2.0) is None
    assert time.monotonic() - started < 10  # a broker that is away delays the start a little only
