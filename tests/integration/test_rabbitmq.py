"""CloudStack's RabbitMQ event bus into the collector, against a real RabbitMQ node (Debian's
rabbitmq-server, started by the tests on free ports): messages as CloudStack's RabbitMQEventBus
publishes them (durable topic exchange, routing key `management-server.<Category>.<Type>.
<ResourceType>.<uuid>`, persistent, the Kafka JSON as body), published with pika. Poison is
dead-lettered with its bytes; a broker restart and `kill -9` of `kvmeter collector` lose nothing
and bill nothing twice."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import pika
import pytest

from kvmeter.collector.config import RabbitConfig
from kvmeter.collector.feed import Feeder
from kvmeter.collector.input_rabbitmq import RabbitInput, resource_key
from kvmeter.collector.inputs import Delivery
from kvmeter.collector.metrics import Metrics
from kvmeter.collector.model import Record, Settings
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store
from kvmeter.proto import pb
from tests.collector_support import (
    ACCT_A,
    HOUR,
    MIN,
    T0,
    Clock,
    expected_usage,
    net_by_short_key,
    routing_key,
    scenario,
    usage_event,
    wait_for,
)
from tests.harness.ports import free_port
from tests.harness.processes import Process
from tests.harness.rabbitmq import Node

NOW = T0 + 5 * HOUR
TIME_TYPES = (1, 2, 3)  # RUNNING_VM, ALLOCATED_VM, IP_ADDRESS: what events alone give


def publish(node: Node, exchange: str, messages: Iterable[tuple[str, bytes]]) -> None:
    """As RabbitMQEventBus: the exchange declared topic and durable, PERSISTENT_TEXT_PLAIN."""
    connection = pika.BlockingConnection(pika.URLParameters(node.url))
    channel = connection.channel()
    channel.exchange_declare(exchange, exchange_type="topic", durable=True)
    channel.confirm_delivery()
    for key, body in messages:
        channel.basic_publish(
            exchange, key, body, pika.BasicProperties(content_type="text/plain", delivery_mode=2)
        )
    connection.close()


def time_usage(store: Store) -> dict[tuple[str, int, str, str, int], int]:
    return {k: v for k, v in net_by_short_key(store.net_usage()).items() if k[1] in TIME_TYPES}


def expected_time_usage() -> dict[tuple[str, int, str, str, int], int]:
    return {k: v for k, v in expected_usage(NOW).items() if k[1] in TIME_TYPES and v}


def names() -> RabbitConfig:
    uid = uuid.uuid4().hex[:8]
    return RabbitConfig(exchange=f"cloudstack-events-{uid}", queue=f"kvmeter-{uid}", prefetch=3)


@pytest.fixture
def store(tmp_path: Path) -> Iterable[Store]:
    s = Store(f"sqlite:///{tmp_path}/usage.db")
    s.migrate()
    yield s
    s.close()


class Running:
    """The collector's loop over one RabbitMQ input, on its own thread."""

    def __init__(self, store: Store, cfg: RabbitConfig):
        self.input = RabbitInput(cfg)
        self.feeder = Feeder(
            Collector(store, Settings(), Clock(NOW)),
            [self.input],
            Metrics(),
            tick_seconds=0.5,
            poll_timeout=0.2,
        )
        self.errors: list[BaseException] = []
        self.feeder.start()  # the queue is declared and bound before anything is published
        # (opened aside: start() does not wait; what the stream holds already is applied here)
        wait_for(lambda: self.feeder.step(timeout=0.2) or self.input.connection is not None, 30, "connected")
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.feeder.stop_event.is_set():
                self.feeder.step()
        except BaseException as exc:  # pragma: no cover - reported by stop()
            self.errors.append(exc)

    def stop(self) -> None:
        self.feeder.stop()
        self.thread.join(30)
        self.feeder.close()
        assert not self.thread.is_alive()
        assert not self.errors


def connected(rabbit: RabbitInput) -> None:
    """Until the input's connection, opened aside (start() does not wait), is the loop's (before
    anything is published: what a poll gets here is not applied)."""
    wait_for(lambda: rabbit.poll(0.2) == [] and rabbit.connection is not None, 30, "connected")


def test_routing_keys_are_cloudstacks() -> None:
    key, value = usage_event("VM.START", "9b1f-vm", ACCT_A, T0)
    assert routing_key(value) == "management-server.UsageEvent.VM-START.com-cloud-vm-VirtualMachine.9b1f-vm"
    assert resource_key(routing_key(value)) == key
    assert resource_key("management-server.ActionEvent.ACCOUNT-DELETE.Account.*") is None


def test_cloudstack_messages_become_usage_and_poison_is_dead_lettered(
    rabbitmq_node: Node, store: Store
) -> None:
    cfg = names()
    cfg = RabbitConfig(rabbitmq_node.url, cfg.exchange, cfg.queue, prefetch=cfg.prefetch)
    sc = scenario()
    run = Running(store, cfg)
    try:
        poison = b'{"event": "VM.START", "truncated'
        publish(
            rabbitmq_node,
            cfg.exchange,
            [
                *[(routing_key(v), v) for _, v in sc.events],
                ("management-server.UsageEvent.VM-START.*.*", poison),
            ],
        )
        wait_for(lambda: len(store.dead_letter_rows()) == 1, 30, "the poison dead-lettered")
        wait_for(lambda: time_usage(store) == expected_time_usage(), 30, "the expected usage")
    finally:
        run.stop()
    [letter] = store.dead_letter_rows()
    assert (letter["source"], letter["reason"], bytes(letter["raw"])) == (
        "lifecycle",
        "malformed_json",
        poison,
    )
    assert letter["origin"] == f"rabbitmq:{cfg.queue}@{len(sc.events)}"
    # Every event carries its place in the stream: the delivery order the clock-skew rule uses.
    with store.read() as conn:
        stored = [pb.LifecycleEvent.FromString(row[2]) for row in store.events_since(conn, 0, 1000)]
    places = sorted((ev.delivery_source, ev.delivery_seq) for ev in stored)
    assert places == [(f"rabbitmq:{cfg.queue}", i) for i in range(len(sc.events))]
    # A second replica reads the whole stream again: all known, nothing new, the same usage.
    again = Running(store, cfg)
    try:
        wait_for(lambda: again.feeder.totals.known_events == len(sc.events), 30, "the stream read again")
    finally:
        again.stop()
    assert again.feeder.totals.events == 0
    assert time_usage(store) == expected_time_usage()


def test_a_broker_restart_loses_nothing_and_bills_nothing_twice(rabbitmq_node: Node, store: Store) -> None:
    cfg = names()
    cfg = RabbitConfig(rabbitmq_node.url, cfg.exchange, cfg.queue, prefetch=2)
    sc = scenario()
    messages = [(routing_key(v), v) for _, v in sc.events]
    run = Running(store, cfg)
    try:
        publish(rabbitmq_node, cfg.exchange, messages[:3])
        wait_for(lambda: run.feeder.totals.events == 3, 30, "the first half stored")
        rabbitmq_node.restart()
        wait_for(lambda: run.input.connection is not None and run.input.last_error == "", 60, "a reconnect")
        publish(rabbitmq_node, cfg.exchange, messages[3:])
        wait_for(lambda: time_usage(store) == expected_time_usage(), 30, "the expected usage")
    finally:
        run.stop()
    assert run.feeder.totals.events == len(sc.events)  # each stored once; the re-read ones were known
    assert run.feeder.totals.known_events >= 3  # the stream was read from its start again
    assert store.dead_letter_rows() == []


def test_a_classic_queue_is_acknowledged_only_after_the_commit(rabbitmq_node: Node, store: Store) -> None:
    cfg = names()
    cfg = RabbitConfig(rabbitmq_node.url, cfg.exchange, cfg.queue, queue_type="classic", prefetch=100)
    sc = scenario()
    first = RabbitInput(cfg)
    first.start()
    connected(first)
    publish(rabbitmq_node, cfg.exchange, [(routing_key(v), v) for _, v in sc.events])
    got: list[Record] = []
    wait_for(
        lambda: bool(got.extend(r for d in first.poll(0.2) for r in d.records)) or len(got) == 6, 30, "all"
    )
    first.close()  # a crash before the commit: nothing was acknowledged
    second = RabbitInput(cfg)
    second.start()
    assert not second.caught_up()  # the six are back in the queue
    feeder = Feeder(Collector(store, Settings(), Clock(NOW)), [second], Metrics(), poll_timeout=0.2)
    wait_for(lambda: feeder.step(measures=False) or second.caught_up(), 30, "the queue read again")
    second.close()
    assert feeder.totals.events == len(sc.events)
    third = RabbitInput(cfg)
    third.start()
    connected(third)
    assert third.caught_up()  # acknowledged after the commit: gone from the queue
    assert third.poll(0.5) == []
    third.close()
    assert [r.order for r in got] == [None] * len(got)  # a classic queue keeps no replayable order


def test_replicas_sharing_a_classic_queue_each_catch_up_without_waiting(
    rabbitmq_node: Node, store: Store
) -> None:
    """Replicas on one classic queue share its backlog: each reads a part of what the queue held
    when it connected. A replica whose part is read, the queue holding nothing ready, has caught
    up: its measures start now. Before the fix it waited for the whole backlog it saw at connect,
    which it never reads alone: the collector's catch-up ran out its 60 s at every start."""
    cfg = names()
    cfg = RabbitConfig(rabbitmq_node.url, cfg.exchange, cfg.queue, queue_type="classic", prefetch=1)
    declaring = RabbitInput(cfg)  # the queue and its bindings, as a replica's earlier run left them
    declaring.start()
    connected(declaring)
    declaring.close()
    sc = scenario()
    publish(rabbitmq_node, cfg.exchange, [(routing_key(v), v) for _, v in sc.events])
    one, two = RabbitInput(cfg), RabbitInput(cfg)
    held: list[Delivery] = []  # two's share: one message at a time (prefetch 1), not acknowledged yet
    two.start()
    wait_for(
        lambda: bool(held.extend(two.poll(0.2))) or (two.connection is not None and bool(held)), 30, "two"
    )
    one.start()
    first = Feeder(Collector(store, Settings(), Clock(NOW)), [one], Metrics(), poll_timeout=0.2)
    wait_for(lambda: first.step(measures=False) or one.caught_up(), 30, "one's share read")
    second = Feeder(Collector(store, Settings(), Clock(NOW)), [two], Metrics(), poll_timeout=0.2)
    for delivery in held:
        second.apply(delivery)
    assert first.totals.events + second.totals.events == len(sc.events)
    wait_for(two.caught_up, 5, "two caught up")
    one.close()
    two.close()


class Collector9(Process):
    """`kvmeter collector` with a [rabbitmq] section and no Kafka."""

    def __init__(self, workdir: Path, node: Node, cfg: RabbitConfig, db: str, port: int):
        super().__init__("collector", workdir)
        self.config = workdir / "collector.toml"
        self.config.write_text(
            f"""
[store]
url = "{db}"
[rabbitmq]
url = "{node.url}"
exchange = "{cfg.exchange}"
queue = "{cfg.queue}"
binding_keys = ["management-server.UsageEvent.#", "management-server.ResourceStateEvent.#"]
prefetch = 7
[usage]
tick_seconds = 0.5
[api]
listen = "127.0.0.1:{port}"
"""
        )

    def args(self) -> list[str]:
        import sys

        return [sys.executable, "-m", "kvmeter", "collector", "--config", str(self.config)]


def stored_events(store: Store) -> int:
    with store.read() as conn:
        return len(store.events_since(conn, 0, 100_000))


def test_kill_9_of_kvmeter_collector_mid_stream_loses_nothing(rabbitmq_node: Node, tmp_path: Path) -> None:
    """The real command from a TOML file with a [rabbitmq] section: 40 VMs started and stopped
    while it runs, killed with SIGKILL in the middle, started again: every event stored once,
    every VM's running time exact. An action event is published too: not bound, never read."""
    cfg = names()
    db = f"sqlite:///{tmp_path}/usage.db"
    proc = Collector9(tmp_path, rabbitmq_node, cfg, db, free_port())
    vms = [f"9b1f0000-0000-4000-8000-{i:012d}" for i in range(40)]
    events = []
    for i, vm in enumerate(vms):
        events.append(usage_event("VM.START", vm, ACCT_A, T0 + i * MIN)[1])
        events.append(usage_event("VM.STOP", vm, ACCT_A, T0 + i * MIN + (i + 1) * 1000)[1])
    action = b'{"eventDateTime":"2024-05-14 09:00:00 +0000","status":"Completed","event":"VM.START",'
    action += b'"entity":"VirtualMachine","entityuuid":"x","account":"a","user":"u"}'
    proc.start()
    store = Store(db)
    try:
        wait_for(lambda: "RabbitMQ 127.0.0.1" in proc.logs(), 60, "the collector bound its queue")
        publish(rabbitmq_node, cfg.exchange, [(routing_key(action), action)])
        publisher = threading.Thread(
            target=lambda: [
                (publish(rabbitmq_node, cfg.exchange, [(routing_key(e), e)]), time.sleep(0.02))
                for e in events
            ]
        )
        publisher.start()
        wait_for(lambda: store.version() > 0 and stored_events(store) >= 20, 60, "some events stored")
        proc.kill9()
        killed_at = stored_events(store)
        assert killed_at < len(events), "killed too late to prove anything"
        proc.start()
        publisher.join(60)
        wait_for(lambda: stored_events(store) == len(events), 60, "every event stored")
        running = {}
        wait_for(
            lambda: (
                running.update({k.resource: v for k, v in store.net_usage().items() if k.usage_type == 1})
                or len(running) == len(vms)
            ),
            30,
            "every VM's running time",
        )
    finally:
        proc.stop()
        logs = proc.logs()
    assert running == {vm: (i + 1) * 1000 for i, vm in enumerate(vms)}, logs
    assert store.dead_letter_rows() == []
    assert stored_events(store) == len(events)  # the action event was never routed to the queue
    store.close()


def test_an_unreachable_broker_is_retried_with_backoff_and_reported_degraded() -> None:
    now = [1000.0]
    port = free_port()  # nothing listens there
    rabbit = RabbitInput(RabbitConfig(f"amqp://guest:guest@127.0.0.1:{port}/%2F"), monotonic=lambda: now[0])
    rabbit.start()
    assert rabbit.poll(5) == []  # the attempt's outcome, waited for
    assert rabbit.connection is None
    assert "AMQPConnectionError" in rabbit.last_error
    assert rabbit.status()["degraded"] == ""
    assert rabbit.caught_up()  # nothing to wait for: measures go on
    first_error = rabbit.last_error
    rabbit.last_error = ""
    assert rabbit.poll(0) == []  # before the backoff is over: no new attempt
    assert rabbit.last_error == ""
    now[0] += 0.6
    assert rabbit.poll(5) == []  # after it: one more attempt, and the next wait doubles
    assert rabbit.last_error == first_error
    assert rabbit._backoff == 2.0
    now[0] += 61
    assert rabbit.status()["degraded"] == "RabbitMQ unreachable for 62 s: AMQPConnectionError"
    rabbit.close()


def test_a_queue_declared_otherwise_is_a_clear_error_and_leaves_no_connection(rabbitmq_node: Node) -> None:
    cfg = names()
    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq_node.url))
    connection.channel().queue_declare(cfg.queue, durable=True)  # a classic queue of that name
    connection.close()
    rabbit = RabbitInput(RabbitConfig(rabbitmq_node.url, cfg.exchange, cfg.queue, queue_type="stream"))
    rabbit.start()
    assert rabbit.poll(5) == []
    assert rabbit.connection is None
    assert "PRECONDITION_FAILED" in rabbit.last_error
    assert "x-queue-type" in rabbit.last_error
    wait_for(
        lambda: rabbitmq_node.ctl("list_connections", "-q", "name").strip() == "", 30, "no connection left"
    )
    rabbit.close()
