"""Lifecycle inputs other than Kafka at their edges: an events file rotated between two polls, a
RabbitMQ broker that never finishes the handshake, a routing key that is not UTF-8."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pika

from kvmeter.collector.config import RabbitConfig
from kvmeter.collector.feed import Feeder
from kvmeter.collector.input_files import EventsFile
from kvmeter.collector.input_rabbitmq import RabbitInput
from kvmeter.collector.metrics import Metrics
from kvmeter.collector.model import Settings
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store
from tests.collector_support import ACCT_A, HOUR, T0, VM1, VM2, Clock, routing_key, usage_event, wait_for
from tests.harness.rabbitmq import Node


def test_a_rotated_events_file_is_read_to_its_end_before_the_new_one(tmp_path: Path) -> None:
    """A followed events file renamed away (logrotate's default: rename, create a new one) is
    read to its end before the file that takes its name: the lines its writer appended after
    the last poll and before the rotation are events like any other, never skipped."""
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"a": 1}\n')
    feed = EventsFile(path)
    try:
        assert [r.value for r in feed.read_new()] == [b'{"a": 1}']
        with open(path, "ab") as f:
            f.write(b'{"b": 2}\n')  # written before the rotation, not polled yet
        os.rename(path, tmp_path / "events.jsonl.1")
        path.write_bytes(b'{"c": 3}\n')
        assert [r.value for r in feed.read_new()] == [b'{"b": 2}', b'{"c": 3}']
    finally:
        feed.close()


def test_a_broker_that_never_answers_the_handshake_is_retried_not_fatal(silent_broker: int) -> None:
    """A broker that accepts the connection but never completes the AMQP handshake is an
    unreachable broker like any other: start() and poll() note the error and retry with
    backoff (the collector's other inputs go on), neither raises (which ended the collector)."""
    now = [1000.0]
    url = f"amqp://guest:guest@127.0.0.1:{silent_broker}/%2F?stack_timeout=0.5"
    rabbit = RabbitInput(RabbitConfig(url), monotonic=lambda: now[0])
    try:
        rabbit.start()
        assert rabbit.poll(5) == []  # the attempt's outcome, waited for
        assert rabbit.connection is None
        assert "AMQPConnectorStackTimeout" in rabbit.last_error
        assert rabbit.caught_up()
        now[0] += 0.6
        assert rabbit.poll(5) == []  # the next attempt, after the backoff: the same error
        assert rabbit._backoff == 2.0
        now[0] += 61
        degraded = rabbit.status()["degraded"]
        assert degraded.startswith("RabbitMQ unreachable for 62 s"), degraded
        assert "AMQPConnectorStackTimeout" in degraded
    finally:
        rabbit.close()


def test_a_routing_key_that_is_not_utf8_neither_stops_nor_skips(rabbitmq_node: Node, tmp_path: Path) -> None:
    """A message under a routing key that is not UTF-8 (AMQP's shortstr is bytes: any publisher
    on the exchange can send one; pika hands it over as bytes) is applied like any other, its
    key's last part taken as bytes as a Kafka key is: the collector's loop never raises on it
    (which ended the collector, and every restart read the stream up to it again)."""
    uid = uuid.uuid4().hex[:8]
    cfg = RabbitConfig(rabbitmq_node.url, f"cloudstack-events-{uid}", f"kvmeter-{uid}", prefetch=10)
    store = Store(f"sqlite:///{tmp_path}/usage.db")
    store.migrate()
    rabbit = RabbitInput(cfg)
    feeder = Feeder(Collector(store, Settings(), Clock(T0 + HOUR)), [rabbit], Metrics(), tick_seconds=3600)
    try:
        feeder.start()
        wait_for(lambda: feeder.step(timeout=0.2) or rabbit.connection is not None, 20, "connected")
        odd_key, odd = usage_event("VM.START", VM1, ACCT_A, T0)
        _, after = usage_event("VM.START", VM2, ACCT_A, T0)
        connection = pika.BlockingConnection(pika.URLParameters(rabbitmq_node.url))
        channel = connection.channel()
        channel.confirm_delivery()
        props = pika.BasicProperties(content_type="text/plain", delivery_mode=2)
        channel.basic_publish(
            cfg.exchange, routing_key(odd).encode()[: -len(odd_key)] + b"\xff\xfe", odd, props
        )
        channel.basic_publish(cfg.exchange, routing_key(after), after, props)
        connection.close()

        def stored() -> bool:
            feeder.step(timeout=0.2)
            return feeder.totals.events + len(store.dead_letter_rows()) >= 2

        wait_for(stored, 20, "both messages applied")
        assert feeder.totals.events == 2, store.dead_letter_rows()
    finally:
        feeder.close()
        store.close()
