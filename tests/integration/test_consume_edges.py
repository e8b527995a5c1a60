"""The collector's Kafka consumption at its edges, with the real KafkaInput (and Feeder, and the
`kvmeter collector` command) against the test broker: the lag gauge after a rebalance and of a
quiet partition newly assigned, /health's partitions under cooperative rebalancing, the
lifecycle catch-up when the broker is down at start, /health while the measures topic cannot be
read."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka import Producer, TopicPartition

from kvmeter.collector.config import KafkaConfig
from kvmeter.collector.feed import Feeder
from kvmeter.collector.input_kafka import KafkaInput
from kvmeter.collector.inputs import Delivery
from kvmeter.collector.metrics import Metrics
from kvmeter.collector.model import Settings
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store
from tests.collector_support import HOUR, T0, Clock, scenario
from tests.harness.kafka import FAST_GROUP
from tests.harness.ports import free_port

NOW = T0 + 5 * HOUR


# -- helpers ---------------------------------------------------------------------------------------
def produce(bootstrap: str, topic: str, records: list[tuple[int | None, bytes | None, bytes]]) -> None:
    """(partition or None, key, value) records, flushed."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for partition, key, value in records:
        if partition is None:
            producer.produce(topic, value=value, key=key)
        else:
            producer.produce(topic, value=value, key=key, partition=partition)
    assert producer.flush(30) == 0


def config(
    bootstrap: str, measures: str, lifecycle: str, *, batch_size: int = 2, **options: object
) -> KafkaConfig:
    return KafkaConfig(
        bootstrap, measures, lifecycle, f"g-{measures}", batch_size=batch_size,
        options={**FAST_GROUP, **options},
    )  # fmt: skip


def lag_samples(metrics: Metrics, topic: str) -> dict[int, float]:
    """kvmeter_consumer_lag of one topic as this replica exports it: {partition: value}."""
    return {
        int(s.labels["partition"]): s.value
        for family in metrics.registry.collect()
        if family.name == "kvmeter_consumer_lag"
        for s in family.samples
        if s.labels["topic"] == topic
    }


def owned(kafka: KafkaInput) -> set[int]:
    """The measures partitions librdkafka says this consumer holds now."""
    return {tp.partition for tp in kafka.measures.assignment()}


def pump(kafka: KafkaInput, seconds: float, until: Callable[[], bool] = lambda: False) -> None:
    """Poll (and acknowledge, without applying: only offsets matter here) for a while."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not until():
        for delivery in kafka.poll(0.1):
            delivery.ack()


class Gate:
    """A TCP forwarder to the broker that starts listening only when opened: until then the
    bootstrap address refuses connections, as a broker that is down at the collector's start."""

    def __init__(self, target: str):
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.port = free_port()
        self._server: socket.socket | None = None
        self._stop = threading.Event()

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def open(self) -> None:
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(16)
        server.settimeout(0.2)
        self._server = server
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        assert self._server is not None
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._copy, args=(a, b), daemon=True).start()

    @staticmethod
    def _copy(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.close()


@pytest.fixture
def inputs() -> Iterator[list[KafkaInput]]:
    made: list[KafkaInput] = []
    yield made
    for k in made:
        try:
            k.close()
        except Exception:
            pass


# -- 1. the consumer-lag gauge after rebalances ------------------------------------------------------
def test_lag_gauge_of_a_partition_moved_to_another_replica_is_not_kept(
    kafka_bootstrap: str, unique_topic: Callable[..., str], inputs: list[KafkaInput]
) -> None:
    """A partition revoked from a replica leaves its lag gauge (the old owner exported the last
    lag it saw for ever: the lag alert fired whatever the new owner did)."""
    measures, lifecycle = unique_topic("measures", partitions=2), unique_topic("cloudstack")
    produce(kafka_bootstrap, measures, [(i % 2, b"h", b"x%d" % i) for i in range(800)])
    metrics_a = Metrics()
    a = KafkaInput(config(kafka_bootstrap, measures, lifecycle, batch_size=1), metrics_a)
    inputs.append(a)
    a.start()
    # A alone: both partitions, a record or so read from each, lag exported for both.
    read: set[int] = set()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (owned(a) == {0, 1} and read == {0, 1}):
        for delivery in a.poll(0.1):
            for record in delivery.records:
                if record.order is not None and record.order[0].startswith(measures):
                    partition = int(record.order[0].rsplit("/", 1)[1])
                    read.add(partition)
                    a.measures.pause([TopicPartition(measures, partition)])  # one record is enough
            delivery.ack()
    assert owned(a) == {0, 1}
    assert read == {0, 1}
    # A is slow (its store, say): it reads no more for now, and is far behind on both.
    a.measures.pause(list(a.measures.assignment()))
    a.update_lag()
    assert set(lag_samples(metrics_a, measures)) == {0, 1}
    assert min(lag_samples(metrics_a, measures).values()) > 300
    # B joins the group: one partition moves to it.
    b = KafkaInput(config(kafka_bootstrap, measures, lifecycle, batch_size=1), Metrics())
    inputs.append(b)
    b.start()
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline and not (len(owned(a)) == 1 and len(owned(b)) == 1):
        for k in (a, b):
            for delivery in k.poll(0.1):
                delivery.ack()
    assert (len(owned(a)), len(owned(b))) == (1, 1), (owned(a), owned(b))
    a.update_lag()
    moved = ({0, 1} - owned(a)).pop()
    exported = lag_samples(metrics_a, measures)
    assert moved not in exported, (
        f"replica A still exports lag {exported[moved]:g} for partition {moved}, which replica B owns now"
    )


def test_lag_of_a_quiet_partition_newly_assigned_is_its_true_lag_not_its_length(
    kafka_bootstrap: str, unique_topic: Callable[..., str], inputs: list[KafkaInput]
) -> None:
    """A partition nothing was read from yet in this assignment is behind from its committed
    offset (it was counted from the partition's start: a quiet partition showed its length)."""
    measures, lifecycle = unique_topic("measures"), unique_topic("cloudstack")
    produce(kafka_bootstrap, measures, [(0, b"h", b"x%d" % i) for i in range(20)])
    first = KafkaInput(config(kafka_bootstrap, measures, lifecycle, batch_size=5), Metrics())
    inputs.append(first)
    first.start()
    seen = 0
    deadline = time.monotonic() + 30
    while seen < 20 and time.monotonic() < deadline:
        for delivery in first.poll(0.2):
            if delivery.kind == "measures":
                seen += len(delivery.records)
            delivery.ack()
    assert seen == 20
    first.close()  # commits: the group's offset is the partition's end
    inputs.remove(first)

    metrics = Metrics()
    second = KafkaInput(config(kafka_bootstrap, measures, lifecycle, batch_size=5), metrics)
    inputs.append(second)
    second.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pump(second, 0.5)
        second.update_lag()
        if owned(second) == {0} and 0 in lag_samples(metrics, measures):
            break
    pump(second, 2.0)  # a few more fetches: nothing new arrives
    second.update_lag()
    committed = second.measures.committed(list(second.measures.assignment()), timeout=10)
    assert [tp.offset for tp in committed] == [20]  # nothing is behind
    assert lag_samples(metrics, measures).get(0) == 0  # its committed offset is its end


def test_health_partitions_follow_an_incremental_rebalance(
    kafka_bootstrap: str, unique_topic: Callable[..., str], inputs: list[KafkaInput]
) -> None:
    """Under the cooperative protocol the callbacks carry only what changed: /health's partitions
    are added and removed by them (replaced: a replica still reading one showed none)."""
    measures, lifecycle = unique_topic("measures", partitions=2), unique_topic("cloudstack")
    produce(kafka_bootstrap, measures, [(i % 2, b"h", b"x%d" % i) for i in range(10)])
    coop = {"partition.assignment.strategy": "cooperative-sticky"}
    a = KafkaInput(config(kafka_bootstrap, measures, lifecycle, **coop), Metrics())
    inputs.append(a)
    a.start()
    pump(a, 30, until=lambda: owned(a) == {0, 1})
    assert a.status()["measures_partitions"] == [0, 1]
    b = KafkaInput(config(kafka_bootstrap, measures, lifecycle, **coop), Metrics())
    inputs.append(b)
    b.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (len(owned(a)) == 1 and len(owned(b)) == 1):
        for k in (a, b):
            for delivery in k.poll(0.1):
                delivery.ack()
    assert (len(owned(a)), len(owned(b))) == (1, 1), (owned(a), owned(b))
    pump(a, 1.0)
    pump(b, 1.0)
    assert a.status()["measures_partitions"] == sorted(owned(a))
    assert b.status()["measures_partitions"] == sorted(owned(b))


# -- 2. lifecycle catch-up when the broker is not there at start -------------------------------------
def test_catch_up_waits_for_the_lifecycle_topic_when_the_broker_is_down_at_start(
    kafka_bootstrap: str, unique_topic: Callable[..., str], tmp_path: Path
) -> None:
    """While no broker has said whether the lifecycle topic exists, the lifecycle is not caught
    up (its partitions were none, so the catch-up ended at once and measures came first)."""
    measures, lifecycle = unique_topic("measures"), unique_topic("cloudstack")
    sc = scenario()
    produce(kafka_bootstrap, lifecycle, [(None, k, v) for k, v in sc.events])
    produce(kafka_bootstrap, measures, [(None, b"h", v) for v in sc.batches])
    gate = Gate(kafka_bootstrap)  # the collector's bootstrap: refused until opened
    store = Store(f"sqlite:///{tmp_path}/usage.db")
    store.migrate()
    metrics = Metrics()
    kafka = KafkaInput(config(gate.bootstrap, measures, lifecycle, batch_size=3), metrics)
    live = Feeder(
        Collector(store, Settings(), Clock(NOW)), [kafka], metrics, tick_seconds=3600, poll_timeout=0.2
    )
    seen: dict[str, object] = {}
    apply = live.apply

    def applying(delivery: Delivery) -> None:  # what was known when the first measures came
        if delivery.kind == "measures":
            seen.setdefault("events_before_first_measures", live.totals.events)
        apply(delivery)

    live.apply = applying  # type: ignore[method-assign]

    def run() -> None:
        try:
            live.start()
            live.catch_up(timeout_s=50)
            seen["events_at_catch_up_end"] = live.totals.events
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and store.marks() != {"stream-h1": 2, "stream-h2": 2}:
                live.step()
        except BaseException as exc:
            seen["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        time.sleep(12)  # past start()'s 10-s metadata wait: the broker is "down" at start
        gate.open()
        thread.join(120)
        assert not thread.is_alive()
    finally:
        live.stop()
        thread.join(10)
        live.close()
        gate.close()
    assert "error" not in seen, seen
    assert store.marks() == {"stream-h1": 2, "stream-h2": 2}
    store.close()
    # lifecycle events applied when the catch-up ended, and when the first measures were applied:
    # the whole backlog, both times
    assert (seen["events_at_catch_up_end"], seen["events_before_first_measures"]) == (len(sc.events),) * 2


# -- 3. /health when the measures topic cannot be read ------------------------------------------------
def test_health_is_degraded_while_the_measures_topic_does_not_exist(
    kafka_bootstrap: str, unique_topic: Callable[..., str], tmp_path: Path
) -> None:
    """A measures topic that cannot be read (absent, access refused) turns /health degraded
    after degraded_after_seconds (it said ok while nothing was metered)."""
    lifecycle = unique_topic("cloudstack")
    missing = f"kvmeter.measures-{uuid.uuid4().hex[:8]}"  # never created
    store = Store(f"sqlite:///{tmp_path}/usage.db")
    store.migrate()
    metrics = Metrics()
    kafka = KafkaInput(
        KafkaConfig(kafka_bootstrap, missing, lifecycle, f"g-{missing}", degraded_after_s=3,
                    options=dict(FAST_GROUP)),
        metrics,
    )  # fmt: skip
    live = Feeder(
        Collector(store, Settings(), Clock(NOW)), [kafka], metrics, tick_seconds=3600, poll_timeout=0.2
    )
    try:
        live.start()
        live.catch_up(timeout_s=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            live.step()
        status = live.status()
    finally:
        live.close()
        store.close()
    assert status["measures_partitions"] == []
    assert status["degraded"], f"/health would answer ok: {status}"
    assert missing in status["degraded"]


def test_kvmeter_collector_health_is_503_while_its_measures_topic_does_not_exist(
    kafka_bootstrap: str, unique_topic: Callable[..., str], tmp_path: Path
) -> None:
    """The same through `kvmeter collector --config FILE` (degraded_after_seconds = 3)."""
    from tests.integration.test_collector_api_front import CollectorProcess, get

    lifecycle = unique_topic("cloudstack")
    port = free_port()
    c = CollectorProcess(
        tmp_path,
        kafka_bootstrap,
        f'listen = "127.0.0.1:{port}"',
        "degraded_after_seconds = 3",
        lifecycle_topic=lifecycle,
    )  # fmt: skip  (its measures topic, m-<tmp dir name>, is never created)
    try:
        get("127.0.0.1", port, "/health")  # up
        time.sleep(12)  # subscribed, told the topic is not there; 3 s long past
        status, body = get("127.0.0.1", port, "/health")
    finally:
        c.stop()
    assert (status, body["status"]) == (503, "degraded"), (status, body, c.log()[-2000:])
