"""The collector's inputs at the edges of their delivery: a RabbitMQ consumer the broker cancels
(queue deleted, its node gone) reconnects and says so in /health; an events file replaced by
another at least as long is read from its top; the reconciler's corrections, names and snapshot
are stored in the events' own transaction, and a failing store is retried, never the loop's end;
parked measures whose sum the store cannot hold do not stall the feed. Fakes of pika's objects
(as pika 1.x behaves), the CloudStack API double, SQLite."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pika
import pytest
from sqlalchemy.exc import OperationalError

from kvmeter.collector.config import RabbitConfig
from kvmeter.collector.cs_client import CloudStackApi
from kvmeter.collector.feed import Feeder
from kvmeter.collector.input_files import EventsFile
from kvmeter.collector.input_rabbitmq import RabbitInput
from kvmeter.collector.inputs import LIFECYCLE, MEASURES, Delivery
from kvmeter.collector.metrics import Metrics
from kvmeter.collector.model import RUNNING_VM, Record, Settings
from kvmeter.collector.reconciler import Reconciler
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store, reconciliation
from tests.collector_support import ACCT_A, ACCT_B, HOUR, MIN, T0, VM1, Clock, M, Stream, usage_event
from tests.harness import cloudstack_api as api

URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


class FakeBroker:
    """One classic queue, as far as RabbitInput can tell through pika's BlockingConnection.

    What pika 1.x does with a broker-initiated Basic.Cancel (blocking_connection.py,
    BlockingChannel._on_consumer_cancelled_by_broker / _dispatch_events): the consumer is
    forgotten and the callbacks registered with `add_on_cancel_callback` are called with the
    method frame; nothing is raised, the connection and the channel stay open. RabbitMQ sends
    it when the queue is deleted or, in a cluster, the node holding the queue fails
    (https://www.rabbitmq.com/docs/consumer-cancel)."""

    def __init__(self) -> None:
        self.ready: list[bytes] = []  # messages in the queue, not delivered
        self.connections: list[FakeConnection] = []

    def connect(self, _params: Any) -> FakeConnection:
        conn = FakeConnection(self)
        self.connections.append(conn)
        return conn

    def publish(self, body: bytes) -> None:
        self.ready.append(body)

    def cancel_consumers(self) -> None:
        for conn in self.connections:
            if conn.is_open:
                conn.chan.cancelled_by_broker()


class FakeChannel:
    def __init__(self, broker: FakeBroker) -> None:
        self.broker = broker
        self.consumer: Callable[..., None] | None = None
        self.cancel_callbacks: list[Callable[[Any], None]] = []
        self.pending_cancel = False
        self.unacked: dict[int, bytes] = {}
        self.tag = 0
        self.is_open = True

    def exchange_declare(self, *_a: Any, **_k: Any) -> None:
        pass

    def queue_declare(self, _queue: str, **_k: Any) -> Any:
        return SimpleNamespace(method=SimpleNamespace(message_count=len(self.broker.ready)))

    def queue_bind(self, *_a: Any, **_k: Any) -> None:
        pass

    def queue_unbind(self, *_a: Any, **_k: Any) -> None:
        pass

    def basic_get(self, _queue: str, **_k: Any) -> tuple[None, None, None]:
        return None, None, None  # the bindings record (rabbit_bindings): none yet

    def confirm_delivery(self) -> None:
        pass

    def basic_publish(self, *_a: Any, **_k: Any) -> None:
        pass

    def basic_qos(self, **_k: Any) -> None:
        pass

    def basic_consume(self, _queue: str, callback: Callable[..., None], **_k: Any) -> str:
        self.consumer = callback
        return "ctag-1"

    def add_on_cancel_callback(self, callback: Callable[[Any], None]) -> None:
        self.cancel_callbacks.append(callback)

    def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        for tag in [t for t in self.unacked if (t <= delivery_tag if multiple else t == delivery_tag)]:
            del self.unacked[tag]

    def cancelled_by_broker(self) -> None:
        self.consumer = None  # the broker delivers nothing more to it
        self.pending_cancel = True

    def dispatch(self) -> None:
        if self.pending_cancel:
            self.pending_cancel = False
            frame = SimpleNamespace(method=SimpleNamespace(consumer_tag="ctag-1"))
            for callback in self.cancel_callbacks:
                callback(frame)
        while self.consumer is not None and self.broker.ready:
            body = self.broker.ready.pop(0)
            self.tag += 1
            self.unacked[self.tag] = body
            method = SimpleNamespace(delivery_tag=self.tag, routing_key="management-server.x.y.z.*")
            self.consumer(self, method, SimpleNamespace(headers=None), body)


class FakeConnection:
    def __init__(self, broker: FakeBroker) -> None:
        self.broker = broker
        self.chan = FakeChannel(broker)
        self.is_open = True

    def channel(self) -> FakeChannel:
        return self.chan

    def process_data_events(self, time_limit: float = 0) -> None:
        self.chan.dispatch()

    def close(self) -> None:
        self.is_open = False
        self.broker.ready[:0] = list(self.chan.unacked.values())  # unacknowledged: requeued
        self.chan.unacked.clear()
        self.chan.consumer = None


def test_rabbitmq_consumer_cancelled_by_the_broker_is_resumed(monkeypatch: pytest.MonkeyPatch) -> None:
    broker = FakeBroker()
    monkeypatch.setattr(pika, "BlockingConnection", broker.connect)
    now = [0.0]
    source = RabbitInput(RabbitConfig(url=URL, queue_type="classic"), monotonic=lambda: now[0])
    source.start()
    broker.publish(b'{"first": 1}')
    [delivery] = source.poll(5)  # the connection opened aside, then the delivery
    assert [r.value for r in delivery.records] == [b'{"first": 1}']
    delivery.ack()

    # The node holding the queue fails over (or the queue is deleted and declared again): the
    # broker cancels the consumer. Events keep coming.
    broker.cancel_consumers()
    broker.publish(b'{"second": 2}')
    got: list[bytes] = []
    for _ in range(20):  # a long while: backoffs are long past
        now[0] += 60.0
        for d in source.poll(1):
            got += [r.value for r in d.records]
            d.ack()
    assert got == [b'{"second": 2}'], (
        f"after the broker's Basic.Cancel nothing was consumed any more (connections made: "
        f"{len(broker.connections)}; status: {source.status()})"
    )
    source.close()


def test_rabbitmq_health_tells_a_cancelled_consumer(monkeypatch: pytest.MonkeyPatch) -> None:
    broker = FakeBroker()
    monkeypatch.setattr(pika, "BlockingConnection", broker.connect)
    now = [0.0]
    source = RabbitInput(RabbitConfig(url=URL, queue_type="classic"), monotonic=lambda: now[0])
    source.start()
    broker.cancel_consumers()
    for _ in range(5):
        now[0] += 60.0
        source.poll(1)
    status = source.status()
    # Either it consumes again (a new connection, consumer in place) or /health says it does not.
    consuming = broker.connections[-1].chan.consumer is not None
    assert consuming or status["degraded"], f"consumer gone, yet status is {status}"
    source.close()


def test_rabbitmq_connection_opened_after_close_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection is opened beside the loop: one that comes only after the input closed
    (a shutdown while a slow broker answers) is closed, never left open and consuming."""
    broker, release = FakeBroker(), threading.Event()

    def slow(params: Any) -> FakeConnection:
        release.wait(10)
        return broker.connect(params)

    monkeypatch.setattr(pika, "BlockingConnection", slow)
    source = RabbitInput(RabbitConfig(url=URL, queue_type="classic"))
    source.start()
    assert source.poll(0.1) == []
    assert not source.caught_up()  # the first attempt still going
    source.close()
    release.set()
    deadline = time.monotonic() + 5
    while not (broker.connections and not broker.connections[0].is_open) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [c.is_open for c in broker.connections] == [False]


def test_rabbitmq_unexpected_error_while_connecting_is_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the broker's failures are retried: any other error of the attempt's thread (a bug)
    is raised in the loop, as when it connected there, never swallowed with the thread."""

    def broken(_params: Any) -> FakeConnection:
        raise TypeError("a bug")

    monkeypatch.setattr(pika, "BlockingConnection", broken)
    source = RabbitInput(RabbitConfig(url=URL, queue_type="classic"))
    source.start()
    with pytest.raises(TypeError, match="a bug"):
        source.poll(5)
    source.close()


def _line(event: str, resource: str, at: int) -> bytes:
    return usage_event(event, resource, ACCT_A, at)[1] + b"\n"


def test_events_file_replaced_by_a_longer_one_is_read_from_its_top(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(_line("VM.CREATE", VM1, T0) + _line("VM.START", VM1, T0 + HOUR))
    source = EventsFile(path)
    assert len(source.read_new()) == 2

    # Replaced (an atomic rename, logrotate's create mode, a regenerated file) by a new file
    # that is longer than what was read of the old one.
    other = "9b1f0000-0000-4000-8000-000000000vm9"
    new = tmp_path / "events.jsonl.new"
    lines = [
        _line("VM.CREATE", other, T0 + 2 * HOUR),
        _line("VM.START", other, T0 + 2 * HOUR + 1000),
        _line("VM.STOP", other, T0 + 3 * HOUR),
    ]
    new.write_bytes(b"".join(lines))
    os.replace(new, path)
    got = [r.value + b"\n" for r in source.read_new()]
    assert got == lines, f"read {len(got)} of the new file's {len(lines)} lines: {got!r}"


def test_events_file_replacement_loses_events_through_the_feed(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path}/usage.db")
    store.migrate()
    try:
        path = tmp_path / "events.jsonl"
        path.write_bytes(_line("VM.CREATE", VM1, T0) + _line("VM.START", VM1, T0 + HOUR))
        collector = Collector(store, Settings(), Clock(T0 + 10 * HOUR))
        feeder = Feeder(collector, [EventsFile(path)], Metrics(), tick_seconds=3600, poll_timeout=0)
        feeder.step()
        assert feeder.totals.events == 2
        other = "9b1f0000-0000-4000-8000-000000000vm9"
        new = tmp_path / "events.jsonl.new"
        new.write_bytes(
            _line("VM.CREATE", other, T0 + 2 * HOUR)
            + _line("VM.START", other, T0 + 2 * HOUR + 1000)
            + _line("VM.STOP", other, T0 + 3 * HOUR)
        )
        os.replace(new, path)
        feeder.step()
        feeder.step()
        assert feeder.totals.events == 5, (
            f"events stored: {feeder.totals.events} of 5 (dead letters: "
            f"{[(d.reason, d.origin) for d in store.dead_letters()]})"
        )
    finally:
        store.close()


@pytest.fixture
def double() -> Iterator[api.CloudStackApiDouble]:
    with api.CloudStackApiDouble() as d:
        d.cloud["listAccounts"] = [api.account(ACCT_A, "alice"), api.account(ACCT_B, "bob")]
        d.cloud["listDomains"] = [api.domain()]
        d.cloud["listServiceOfferings"] = [api.offering("small", "Small", 1, 512)]
        d.cloud["listVirtualMachines"] = [api.vm(VM1, "web-1", "alice", "Stopped", "small", T0)]
        yield d


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path}/usage.db")
    s.migrate()
    yield s
    s.close()


def _first_pass(store: Store, double: api.CloudStackApiDouble, clock: Clock) -> tuple[Collector, Reconciler]:
    """A VM kvmeter has running, CloudStack lists stopped (its VM.STOP was lost); one pass: one
    witness, no correction yet (the next pass, an hour later, corrects)."""
    collector = Collector(store, Settings(), clock)
    created, started = (
        usage_event("VM.CREATE", VM1, ACCT_A, T0),
        usage_event("VM.START", VM1, ACCT_A, T0 + HOUR),
    )
    collector.apply_events([Record(v, k) for k, v in (created, started)])
    client = CloudStackApi(double.endpoint, api.API_KEY, api.SECRET, timeout_s=5)
    reconciler = Reconciler(collector, client.snapshot, period_s=3600)
    snapshot = reconciler.fetch()
    assert snapshot is not None
    reconciler.apply(snapshot)
    collector.tick()
    return collector, reconciler


def _second_pass_ready(
    store: Store, double: api.CloudStackApiDouble, clock: Clock
) -> tuple[Collector, Reconciler]:
    """_first_pass, then an hour later the second pass's snapshot read and handed to the loop (as
    the reconciler's thread does): its poll delivers the correction."""
    collector, reconciler = _first_pass(store, double, clock)
    clock.now += HOUR
    snapshot = reconciler.fetch()
    assert snapshot is not None
    reconciler._ready = snapshot
    reconciler._fresh.set()
    return collector, reconciler


class Killed(BaseException):
    """kill -9, as far as the code after the instant can tell."""


def _killed() -> None:
    raise Killed


def _listed(store: Store) -> list[str]:
    with store.read() as conn:
        # Offerings the passes note (VM.DYNAMIC.SCALE) left out, as test_reconcile.py's corrections() does.
        return [
            r["event_type"]
            for r in reconciliation.list_corrections(conn)
            if r["event_type"] != "VM.DYNAMIC.SCALE"
        ]


def test_reconciler_ack_store_failure_is_retried_not_raised(
    store: Store, double: api.CloudStackApiDouble, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock(T0 + 10 * HOUR)
    collector, reconciler = _second_pass_ready(store, double, clock)
    real = reconciliation.save_corrections
    failures = [OperationalError("INSERT INTO corrections", {}, Exception("database is locked"))]

    def flaky(*args: Any, **kwargs: Any) -> int:
        if failures:
            raise failures.pop(0)
        return real(*args, **kwargs)

    monkeypatch.setattr(reconciliation, "save_corrections", flaky)
    feeder = Feeder(collector, [reconciler], Metrics(), tick_seconds=3600, poll_timeout=0)
    try:
        feeder.step()  # the feed's contract: a failing store is retried in place, never raised
    except OperationalError as exc:
        pytest.fail(f"a store error in the reconciler's ack escaped the feed's retry: {exc!r}")
    assert _listed(store) == ["VM.STOP"]


def test_correction_applied_before_a_crash_is_listed_afterwards(
    store: Store, double: api.CloudStackApiDouble
) -> None:
    clock = Clock(T0 + 10 * HOUR)
    first = clock.now
    collector, reconciler = _second_pass_ready(store, double, clock)
    feeder = Feeder(collector, [reconciler], Metrics(), tick_seconds=3600, poll_timeout=0)
    [delivery] = reconciler.poll(0)
    assert delivery.records  # the VM.STOP correction
    with pytest.raises(Killed):  # committed, then the process is killed before the ack
        feeder.apply(dataclasses.replace(delivery, ack=_killed))  # (the feed's FAILPOINT instant)

    collector = Collector(store, Settings(), clock)  # restarted
    client = CloudStackApi(double.endpoint, api.API_KEY, api.SECRET, timeout_s=5)
    reconciler = Reconciler(collector, client.snapshot, period_s=3600)
    for _ in range(3):
        clock.now += HOUR
        snapshot = reconciler.fetch()
        assert snapshot is not None
        reconciler.apply(snapshot)
        collector.tick()
    collector.tick()
    billed = sum(r.quantity for r in store.usage(T0 - 24 * HOUR, T0 + 48 * HOUR, usage_type=RUNNING_VM))
    assert billed == first - (T0 + HOUR)  # the correction is in the bill ...
    assert _listed(store) == ["VM.STOP"], "... yet `kvmeter corrections` / /v1/corrections never list it"


def test_reconciler_poll_store_failure_is_retried_not_raised(
    store: Store, double: api.CloudStackApiDouble, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock(T0 + 10 * HOUR)
    collector, reconciler = _second_pass_ready(store, double, clock)
    real = reconciliation.last_pass_ms
    failures = [OperationalError("SELECT reconcile_state", {}, Exception("server closed the connection"))]

    def flaky(*args: Any, **kwargs: Any) -> int | None:
        if failures:
            raise failures.pop(0)
        return real(*args, **kwargs)

    monkeypatch.setattr(reconciliation, "last_pass_ms", flaky)
    feeder = Feeder(collector, [reconciler], Metrics(), tick_seconds=3600, poll_timeout=0)
    for _ in range(3):
        try:
            feeder.step()
        except OperationalError as exc:
            pytest.fail(f"a store error in the reconciler's poll escaped the feed loop: {exc!r}")
    assert _listed(store) == ["VM.STOP"]


class Pushed:
    """An input that delivers what the test pushes, and logs what the loop acknowledges."""

    def __init__(self) -> None:
        self.waiting: list[Delivery] = []
        self.acked: list[str] = []

    def push(self, kind: str, records: list[Record]) -> None:
        self.waiting.append(Delivery(kind, records, lambda: self.acked.append(records[0].origin)))

    def start(self) -> None:
        pass

    def poll(self, timeout: float, *, measures: bool = True) -> list[Delivery]:
        out, self.waiting = self.waiting, []
        return out

    def caught_up(self) -> bool:
        return True

    def status(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


def test_parked_measures_summing_past_int64_do_not_stall_the_feed(store: Store) -> None:
    clock = Clock(T0 + MIN)
    collector = Collector(store, Settings(), clock)
    source = Pushed()
    feeder = Feeder(collector, [source], Metrics(), tick_seconds=0, poll_timeout=0)
    vm2 = "9b1f0000-0000-4000-8000-000000000vm2"  # no event names it (yet): its measures park
    nic = {"instance": vm2, "domain": "i-2-99-VM", "address": "203.0.113.99"}
    poison = Stream("s-poison").batch(
        [
            M(T0, T0 + MIN, 2**62, **nic),
            M(T0, T0 + MIN, 2**62, mac="02:00:3a:7b:00:02", device="vnet1", **nic),
        ]
    )
    source.push(MEASURES, [Record(poison, None, "measures/0@1")])
    feeder.step()
    assert (feeder.totals.parked, source.acked) == (2, ["measures/0@1"])

    clock.now = T0 + 26 * HOUR  # past the park horizon (24 h)
    retries: list[float] = []

    def wait(delay: float) -> bool:  # the feed's backoff; a stop after 5 of them ends the test
        retries.append(delay)
        if len(retries) >= 5:
            feeder.stop_event.set()
        return feeder.stop_event.is_set()

    feeder.stop_event.wait = wait  # type: ignore[method-assign]
    try:
        feeder.step()  # its tick reports the parked measures as UNATTRIBUTED
    except Exception as exc:
        pytest.fail(
            f"the tick failed {len(retries)} times in a row ({feeder.failing!r}) and is retried in place "
            f"for ever: no input is polled again: {exc!r}"
        )
    created = usage_event("VM.CREATE", VM1, ACCT_A, clock.now)
    source.push(LIFECYCLE, [Record(created[1], created[0], "events/0@0")])
    feeder.step()
    assert source.acked[1:] == ["events/0@0"]
