"""RabbitMQ bindings kept to `binding_keys` across restarts: a key taken out is unbound at the
next start (collector/rabbit_bindings.py), against the real rabbitmq-server."""

from __future__ import annotations

import uuid

import pika

from kvmeter.collector.config import RabbitConfig
from kvmeter.collector.input_rabbitmq import RabbitInput
from tests.collector_support import wait_for
from tests.harness.rabbitmq import Node

ACTION = "management-server.ActionEvent.VM-START.VirtualMachine.9b1f-vm"
USAGE = "management-server.UsageEvent.VM-START.com-cloud-vm-VirtualMachine.9b1f-vm"


def _names(node: Node, keys: tuple[str, ...]) -> RabbitConfig:
    uid = uuid.uuid4().hex[:8]
    return RabbitConfig(node.url, f"cloudstack-events-{uid}", f"kvmeter-{uid}", "classic", keys, prefetch=10)


def _publish(node: Node, exchange: str, keys: list[str]) -> None:
    """As CloudStack's RabbitMQEventBus: to the durable topic exchange, persistent."""
    connection = pika.BlockingConnection(pika.URLParameters(node.url))
    channel = connection.channel()
    channel.exchange_declare(exchange, exchange_type="topic", durable=True)
    channel.confirm_delivery()
    for key in keys:
        channel.basic_publish(exchange, key, key.encode(), pika.BasicProperties(delivery_mode=2))
    connection.close()


def _received(cfg: RabbitConfig, expected: int) -> list[bytes]:
    """What a collector started with `cfg` reads (and acknowledges, as after its commit):
    `expected` messages, then a moment more."""
    rabbit = RabbitInput(cfg)
    rabbit.start()
    got: list[bytes] = []

    def read(timeout: float) -> None:
        for delivery in rabbit.poll(timeout):
            got.extend(r.value for r in delivery.records)
            delivery.ack()

    try:
        wait_for(lambda: bool(read(0.2)) or len(got) >= expected, 10, "messages")
        read(0.3)
    finally:
        rabbit.close()
    return got


def _start_and_stop(cfg: RabbitConfig) -> None:
    rabbit = RabbitInput(cfg)
    rabbit.start()
    wait_for(lambda: rabbit.poll(0.2) == [] and rabbit.connection is not None, 10, "connected")
    rabbit.close()


def test_a_key_taken_out_of_binding_keys_is_unbound_at_the_next_start(rabbitmq_node: Node) -> None:
    """binding_keys narrowed from action and usage events to usage events, then a restart: the
    durable queue no longer receives action events. Before, the old binding stayed on the queue:
    it kept filling with (and the collector kept reading) what the operator had removed."""
    wide = _names(rabbitmq_node, ("management-server.ActionEvent.#", "management-server.UsageEvent.#"))
    _start_and_stop(wide)
    narrow = RabbitConfig(**{**wide.__dict__, "binding_keys": ("management-server.UsageEvent.#",)})
    _start_and_stop(narrow)  # the restart with the narrowed list
    _publish(rabbitmq_node, wide.exchange, [ACTION, USAGE])
    assert _received(narrow, 1) == [USAGE.encode()]
    _start_and_stop(wide)  # widened again: bound again
    _publish(rabbitmq_node, wide.exchange, [ACTION, USAGE])
    assert sorted(_received(wide, 2)) == sorted([ACTION.encode(), USAGE.encode()])


def test_the_default_binding_of_a_queue_bound_before_is_removed_when_narrowed(rabbitmq_node: Node) -> None:
    """A queue an earlier kvmeter bound with the default key (management-server.#), no record of
    it kept: started with a narrowed list, the default binding goes, so only what is configured
    comes. Before, everything CloudStack published kept coming."""
    cfg = _names(rabbitmq_node, ("management-server.UsageEvent.#",))
    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq_node.url))
    channel = connection.channel()  # as kvmeter bound it before it kept a record
    channel.exchange_declare(cfg.exchange, exchange_type="topic", durable=True)
    channel.queue_declare(cfg.queue, durable=True)
    channel.queue_bind(cfg.queue, cfg.exchange, routing_key="management-server.#")
    connection.close()
    _start_and_stop(cfg)
    _publish(rabbitmq_node, cfg.exchange, [ACTION, USAGE])
    assert _received(cfg, 1) == [USAGE.encode()]
