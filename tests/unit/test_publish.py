"""Publisher against a fake producer: order, acks advance the spool, failures re-send from the spool."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kvmeter.agent.kafka_client import producer_config
from kvmeter.agent.publish import PROBE_IN_FLIGHT, STALLED_AFTER_S, Publisher
from kvmeter.agent.spool import Spool


class FakeProducer:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.queue: list[tuple[bytes, Callable[[Any, Any], None]]] = []
        self.sent: list[bytes] = []
        self.fail_next = 0
        self.purged = 0
        self.hold = False  # keep messages queued (a broker that does not answer)

    def produce(self, topic: str, value: bytes, key: bytes, on_delivery: Callable[[Any, Any], None]) -> None:
        assert key == b"host-1"
        self.queue.append((value, on_delivery))

    def poll(self, timeout: float) -> int:
        if self.hold:
            return 0
        queue, self.queue = self.queue, []
        for value, callback in queue:
            if self.fail_next:
                self.fail_next -= 1
                callback("broker down", None)
            else:
                self.sent.append(value)
                callback(None, None)
        return len(queue)

    def purge(self) -> None:
        self.purged += 1
        for _, callback in self.queue:
            callback("purged", None)
        self.queue = []


def test_config_forces_idempotence_and_acks_all() -> None:
    config = producer_config("b:1", {"acks": "1", "enable.idempotence": False, "linger.ms": 5})
    assert (config["acks"], config["enable.idempotence"], config["linger.ms"]) == ("all", True, 5)
    assert config["message.timeout.ms"] == 0


def test_delivers_in_order_and_acks_the_spool(tmp_path: Path) -> None:
    producers: list[FakeProducer] = []

    def factory(config: dict[str, Any]) -> FakeProducer:
        producers.append(FakeProducer(config))
        return producers[-1]

    spool = Spool(tmp_path)
    pub = Publisher(spool, bootstrap="b:1", topic="t", key="host-1", producer_factory=factory)
    for seq in range(1, 4):
        spool.append("s", seq, f"batch{seq}".encode(), {}, seq)
    assert pub.flush(1.0)
    assert producers[0].sent == [b"batch1", b"batch2", b"batch3"]
    assert spool.pending() == []
    spool.close()


def test_failed_delivery_rebuilds_and_resends_everything_unacked(tmp_path: Path) -> None:
    producers: list[FakeProducer] = []

    def factory(config: dict[str, Any]) -> FakeProducer:
        producers.append(FakeProducer(config))
        return producers[-1]

    spool = Spool(tmp_path)
    pub = Publisher(
        spool, bootstrap="b:1", topic="t", key="host-1", producer_factory=factory, max_in_flight=2
    )
    for seq in range(1, 6):
        spool.append("s", seq, f"b{seq}".encode(), {}, seq)
    producers[0].fail_next = 1
    pub.pump()
    pub.service(0)  # b1 fails, b2 is delivered out of the broken producer
    assert pub.errors == 1
    assert pub.flush(1.0)
    assert len(producers) == 2
    assert producers[1].sent == [b"b1", b"b2", b"b3", b"b4", b"b5"]  # b2 again: fine, same seq
    assert spool.pending() == []
    spool.close()


def test_in_flight_is_bounded(tmp_path: Path) -> None:
    def held(config: dict[str, Any]) -> FakeProducer:
        producer = FakeProducer(config)
        producer.hold = True
        return producer

    spool = Spool(tmp_path)
    pub = Publisher(spool, bootstrap="b:1", topic="t", key="host-1", producer_factory=held, max_in_flight=3)
    for seq in range(1, 11):
        spool.append("s", seq, b"x", {}, seq)
    assert pub.pump() == 3
    assert pub.in_flight() == 3
    assert pub.pump() == 0
    assert not pub.flush(0.05)
    pub._producer.hold = False
    assert pub.pump() == 0  # at the limit it still serves the client (a stalled loop waits outside it)
    assert pub.in_flight() == 0
    spool.close()


class RefusingProducer(FakeProducer):
    """Refuses values over a size at produce(), as librdkafka does with MSG_SIZE_TOO_LARGE."""

    limit = 8

    def produce(self, topic: str, value: bytes, key: bytes, on_delivery: Callable[[Any, Any], None]) -> None:
        if len(value) > self.limit:
            raise RuntimeError("KafkaError{code=MSG_SIZE_TOO_LARGE}")
        super().produce(topic, value, key, on_delivery)


def test_a_refused_batch_stays_spooled_and_the_agent_keeps_running(tmp_path: Path) -> None:
    producers: list[RefusingProducer] = []

    def factory(config: dict[str, Any]) -> RefusingProducer:
        producers.append(RefusingProducer(config))
        return producers[-1]

    spool = Spool(tmp_path)
    pub = Publisher(spool, bootstrap="b:1", topic="t", key="host-1", producer_factory=factory)
    spool.append("s", 1, b"small", {}, 1)
    spool.append("s", 2, b"far too large", {}, 2)
    spool.append("s", 3, b"after", {}, 3)
    assert not pub.flush(0.2)  # no exception escapes
    assert producers[0].sent == [b"small"]
    assert [f.seq for f in spool.pending()] == [2, 3]  # order kept: nothing skips the refused one
    assert pub.errors >= 1
    assert "MSG_SIZE_TOO_LARGE" in (pub.last_error or "")
    producers[0].limit = 100  # the operator raised message.max.bytes
    assert pub.flush(1.0)
    assert producers[0].sent == [b"small", b"far too large", b"after"]
    spool.close()


def test_an_unreachable_broker_is_retried_ever_less_often_and_logged_once_a_minute(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = producer_config("b:1")
    assert config["reconnect.backoff.ms"] < 1000
    assert config["reconnect.backoff.max.ms"] >= 30_000
    pub = Publisher(Spool(tmp_path), bootstrap="b:1", topic="t", key="host-1", producer_factory=FakeProducer)
    with caplog.at_level(logging.WARNING, logger="kvmeter.agent.kafka"):
        for port in range(40000, 40100):  # librdkafka's error callback at every reconnect attempt
            pub._on_client_error(
                f"b:1/bootstrap: Connect to ipv4#127.0.0.1:{port} failed: Connection refused"
            )
    lines = [r for r in caplog.records if r.name == "kvmeter.agent.kafka"]
    assert len(lines) == 1
    assert "Connection refused" in lines[0].getMessage()
    assert pub.errors == 100  # every one still counted


def test_a_default_an_older_librdkafka_does_not_know_is_left_out() -> None:
    from confluent_kafka import KafkaError, KafkaException

    from kvmeter.agent.kafka_client import confluent_producer

    made: list[dict[str, Any]] = []

    def old_librdkafka(config: dict[str, Any]) -> dict[str, Any]:
        for name in config:
            if name == "metadata.recovery.strategy":
                raise KafkaException(
                    KafkaError(KafkaError._INVALID_ARG, f'No such configuration property: "{name}"')
                )
        made.append(config)
        return config

    config = producer_config("b:1")
    assert config["metadata.recovery.strategy"] == "none"
    produced = confluent_producer(config, old_librdkafka)
    assert "metadata.recovery.strategy" not in produced
    assert produced["reconnect.backoff.max.ms"] == 30_000

    def refuses_linger(config: dict[str, Any]) -> None:
        raise KafkaException(KafkaError(KafkaError._INVALID_ARG, 'Invalid value for "linger.ms"'))

    with pytest.raises(KafkaException, match="linger"):  # anything else still fails loudly
        confluent_producer({**config, "linger.ms": -5}, refuses_linger)
    # the installed librdkafka takes it
    confluent_producer(config).flush(0)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def stats(pid: int, epoch: int) -> str:
    """A librdkafka statistics report, the parts the publisher reads."""
    return (
        '{"name":"rdkafka#producer-1","type":"producer","msg_cnt":3,"brokers":{},"topics":{},'
        f'"eos": {{ "idemp_state": "Assigned", "producer_id": {pid}, "producer_epoch": {epoch}, '
        '"epoch_cnt": 1 }}'
    )


def recording_factory() -> tuple[list[FakeProducer], Callable[[dict[str, Any]], FakeProducer]]:
    producers: list[FakeProducer] = []

    def factory(config: dict[str, Any]) -> FakeProducer:
        producers.append(FakeProducer(config))
        return producers[-1]

    return producers, factory


def test_a_fatal_producer_error_recreates_the_producer_and_resends_everything_unacked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from confluent_kafka import KafkaError

    from kvmeter.agent.metrics import AgentMetrics

    producers, factory = recording_factory()
    metrics = AgentMetrics()
    spool = Spool(tmp_path)
    pub = Publisher(
        spool, bootstrap="b:1", topic="t", key="host-1", producer_factory=factory, metrics=metrics
    )
    for seq in range(1, 4):
        spool.append("s", seq, f"b{seq}".encode(), {}, seq)
    assert pub.flush(1.0)
    producers[0].hold = True  # the broker stops answering; then librdkafka gives up on the producer
    for seq in range(4, 7):
        spool.append("s", seq, f"b{seq}".encode(), {}, seq)
    pub.pump()
    assert pub.in_flight() == 3
    fatal = KafkaError(KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, "broker: out of order sequence", fatal=True)
    with caplog.at_level(logging.WARNING, logger="kvmeter.agent.publish.recovery"):
        for _ in range(5):  # the error callback may repeat: one line, one re-creation
            producers[0].config["error_cb"](fatal)
        assert pub.flush(1.0)
    assert len(producers) == 2
    assert producers[1].sent == [b"b4", b"b5", b"b6"]  # only what the broker never acknowledged
    assert producers[0].purged == 1
    assert spool.pending() == []
    assert pub.recreated == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "kvmeter.agent.publish.recovery"]
    assert len(lines) == 1
    assert "OUT_OF_ORDER_SEQUENCE_NUMBER" in lines[0]
    assert "3 unacknowledged" in lines[0]
    assert (
        metrics.registry.get_sample_value("kvmeter_agent_producer_recreations_total", {"reason": "fatal"})
        == 1.0
    )
    spool.close()


class FatalProducer(FakeProducer):
    """A producer after a fatal error: produce() raises, as librdkafka's does (_FATAL)."""

    def produce(self, topic: str, value: bytes, key: bytes, on_delivery: Callable[[Any, Any], None]) -> None:
        from confluent_kafka import KafkaError, KafkaException

        raise KafkaException(KafkaError(KafkaError._FATAL, "fatal error earlier", fatal=True))


def test_a_producer_that_refuses_everything_as_fatal_is_recreated_not_waited_on(tmp_path: Path) -> None:
    producers: list[FakeProducer] = []

    def factory(config: dict[str, Any]) -> FakeProducer:
        producers.append(FatalProducer(config) if not producers else FakeProducer(config))
        return producers[-1]

    spool = Spool(tmp_path)
    pub = Publisher(spool, bootstrap="b:1", topic="t", key="host-1", producer_factory=factory)
    spool.append("s", 1, b"b1", {}, 1)
    assert pub.flush(1.0)
    assert [len(producers), producers[1].sent] == [2, [b"b1"]]
    spool.close()


def test_an_epoch_climbing_with_nothing_delivered_means_the_broker_lost_the_producer_id(
    tmp_path: Path,
) -> None:
    from kvmeter.agent.metrics import AgentMetrics

    producers, factory = recording_factory()
    metrics = AgentMetrics()
    spool = Spool(tmp_path)
    pub = Publisher(
        spool, bootstrap="b:1", topic="t", key="host-1", producer_factory=factory, metrics=metrics
    )
    assert producers[0].config["statistics.interval.ms"] > 0
    assert producers[0].config["stats_cb"] == pub._on_stats
    spool.append("s", 1, b"b1", {}, 1)
    assert pub.flush(1.0)
    producers[0].config["stats_cb"](stats(7, 0))  # after a delivery: the mark
    producers[0].hold = True
    spool.append("s", 2, b"b2", {}, 2)
    pub.pump()
    producers[0].config["stats_cb"](stats(7, 1))  # one bump (an expired id, recovered by librdkafka): fine
    pub.pump()
    assert len(producers) == 1
    producers[0].config["stats_cb"](stats(7, 12))  # UNKNOWN_PRODUCER_ID answered to every retry
    assert pub.flush(1.0)
    assert len(producers) == 2
    assert producers[1].sent == [b"b2"]
    assert "UNKNOWN_PRODUCER_ID" in (pub.last_error or "")
    assert (
        metrics.registry.get_sample_value(
            "kvmeter_agent_producer_recreations_total", {"reason": "unknown producer"}
        )
        == 1.0
    )
    spool.close()


def test_a_climbing_epoch_while_batches_get_delivered_or_nothing_waits_is_left_alone(tmp_path: Path) -> None:
    producers, factory = recording_factory()
    spool = Spool(tmp_path)
    pub = Publisher(spool, bootstrap="b:1", topic="t", key="host-1", producer_factory=factory)
    for seq, epoch in enumerate([0, 5, 10, 15], start=1):
        spool.append("s", seq, b"x", {}, seq)
        pub.flush(1.0)
        producers[0].config["stats_cb"](stats(7, epoch))  # deliveries in between
    producers[0].config["stats_cb"](stats(7, 30))  # nothing in flight
    producers[0].config["stats_cb"]('{"eos":{"producer_id":-1,"producer_epoch":-1}}')
    producers[0].config["stats_cb"]("not json")
    assert pub.pump() == 0
    assert len(producers) == 1
    spool.close()


def test_a_failure_a_new_producer_does_not_cure_backs_off_instead_of_spinning(tmp_path: Path) -> None:
    producers: list[FakeProducer] = []
    cured = False

    def factory(config: dict[str, Any]) -> FakeProducer:
        producers.append(FakeProducer(config))
        if not cured:
            producers[-1].fail_next = 1_000_000  # e.g. the broker refuses the batch as too large
        return producers[-1]

    clock = Clock()
    spool = Spool(tmp_path)
    pub = Publisher(spool, bootstrap="b:1", topic="t", key="host-1", producer_factory=factory, clock=clock)
    spool.append("s", 1, b"b1", {}, 1)
    made = []
    for _ in range(130):  # about two minutes of the agent's loop, a service every second
        for _ in range(10):
            pub.service(0)
        made.append(len(producers))
        clock.t += 1.0
    # rebuilt after 1, 2, 4, 8, 16, 32 s, then once a minute: not a new producer every pump
    assert 6 <= len(producers) <= 9, made
    assert [f.seq for f in spool.pending()] == [1]  # still spooled
    cured = True  # the operator fixed the cause: the next producer gets it through
    clock.t += 60
    assert pub.flush(1.0)
    spool.close()


def test_a_fatal_delivery_report_recreates_the_producer(tmp_path: Path) -> None:
    from confluent_kafka import KafkaError

    class FatalOnDelivery(FakeProducer):
        def poll(self, timeout: float) -> int:
            queue, self.queue = self.queue, []
            for _, callback in queue:
                callback(KafkaError(KafkaError._FATAL, "idempotence: gap in sequence", fatal=True), None)
            return len(queue)

    producers: list[FakeProducer] = []

    def factory(config: dict[str, Any]) -> FakeProducer:
        producers.append(FatalOnDelivery(config) if not producers else FakeProducer(config))
        return producers[-1]

    spool = Spool(tmp_path)
    pub = Publisher(spool, bootstrap="b:1", topic="t", key="host-1", producer_factory=factory)
    spool.append("s", 1, b"b1", {}, 1)
    spool.append("s", 2, b"b2", {}, 2)
    assert pub.flush(1.0)
    assert producers[1].sent == [b"b1", b"b2"]
    assert pub.recreated == 1
    assert "gap in sequence" in (pub.last_error or "")
    spool.close()


def test_a_fatal_error_raised_by_poll_recreates_the_producer(tmp_path: Path) -> None:
    from confluent_kafka import KafkaError, KafkaException

    class RaisingPoll(FakeProducer):
        def poll(self, timeout: float) -> int:  # confluent-kafka raises a fatal error here
            if self.queue:
                error = KafkaError(KafkaError.UNKNOWN_PRODUCER_ID, "unable to retry", fatal=True)
                raise KafkaException(error)
            return 0

    producers: list[FakeProducer] = []

    def factory(config: dict[str, Any]) -> FakeProducer:
        producers.append(RaisingPoll(config) if not producers else FakeProducer(config))
        return producers[-1]

    spool = Spool(tmp_path)
    pub = Publisher(spool, bootstrap="b:1", topic="t", key="host-1", producer_factory=factory)
    spool.append("s", 1, b"b1", {}, 1)
    pub.service(0)  # no exception escapes to the agent's loop
    assert pub.flush(1.0)
    assert producers[1].sent == [b"b1"]
    assert "UNKNOWN_PRODUCER_ID" in (pub.last_error or "")
    spool.close()


def unanswered(tmp_path: Path) -> tuple[Spool, Publisher, list[FakeProducer], Clock]:
    """A publisher on a test clock whose producers' broker answers nothing (until told)."""
    producers: list[FakeProducer] = []

    def factory(config: dict[str, Any]) -> FakeProducer:
        producers.append(FakeProducer(config))
        producers[-1].hold = True
        return producers[-1]

    clock = Clock()
    spool = Spool(tmp_path)
    pub = Publisher(spool, bootstrap="b:1", topic="t", key="host-1", producer_factory=factory, clock=clock)
    return spool, pub, producers, clock


def test_batches_in_flight_with_nothing_delivered_for_a_while_is_a_stall(tmp_path: Path) -> None:
    spool, pub, producers, clock = unanswered(tmp_path)
    assert not pub.stalled()  # nothing in flight
    spool.append("s", 1, b"b1", {}, 1)
    pub.pump()
    clock.t += STALLED_AFTER_S - 0.5
    spool.append("s", 2, b"b2", {}, 2)
    pub.pump()  # more handed over: still waiting since the first
    assert not pub.stalled()
    clock.t += 0.5
    assert pub.stalled()
    assert pub.in_flight() == 2
    producers[0].hold = False  # the broker is back: the next pump's serving delivers
    spool.append("s", 3, b"b3", {}, 3)
    pub.pump()
    assert pub.in_flight() == 0
    assert not pub.stalled()
    assert spool.pending() == []
    producers[0].hold = True
    spool.append("s", 4, b"b4", {}, 4)
    pub.pump()
    clock.t += STALLED_AFTER_S
    assert pub.stalled()  # a new wait counts from its first batch
    spool.close()


def test_while_nothing_is_delivered_only_a_few_batches_are_handed_over(tmp_path: Path) -> None:
    """An outage of hours keeps its batches in the spool, not a copy of each in librdkafka's
    queue: a few go out to find out when the broker answers, then the rest follow at once."""
    spool, pub, producers, clock = unanswered(tmp_path)
    for seq in range(1, 31):
        spool.append("s", seq, f"b{seq}".encode(), {}, seq)
        pub.pump()
        clock.t += 2.0  # a poll every two seconds, an hour-long outage in small
    assert pub.in_flight() == PROBE_IN_FLIGHT
    assert len(producers[-1].queue) == PROBE_IN_FLIGHT
    producers[-1].hold = False  # the broker is back: the probes are delivered, the rest follow
    pub.service(0)  # (the fake broker delivers at once what it is handed)
    assert spool.pending() == []
    assert pub.in_flight() == 0
    assert producers[-1].sent == [f"b{seq}".encode() for seq in range(1, 31)]
    for seq in range(31, 41):  # delivering: batches go out as they come, up to max_in_flight
        producers[-1].hold = True
        spool.append("s", seq, b"x", {}, seq)
        pub.pump()
        clock.t += 0.1
    assert pub.in_flight() == 10
    spool.close()
