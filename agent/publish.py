"""Publish spooled batches to Kafka in order; the broker's acknowledgement advances the spool.

The producer is idempotent (acks=all, no duplicates from its own retries) and never gives up on a
message by itself (message.timeout.ms=0: infinite), so a broker that is away for minutes only
makes the spool grow; librdkafka delivers in order once it is back. If a delivery still fails
(a fatal producer error, a purge), the producer is rebuilt and every unacknowledged frame is
produced again from the spool, under its original stream id and sequence number.

Not thread-safe: delivery callbacks run inside `service()`/`flush()` on the caller's thread.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from kvmeter.agent.metrics import AgentMetrics
from kvmeter.agent.spool import Frame, Spool
from kvmeter.log_limit import limited_logger

log = logging.getLogger(__name__)
# librdkafka's own log lines and its error callbacks repeat at every reconnect attempt while the
# broker is away: one line per distinct message per minute, with a count of the rest.
KAFKA_LOG = limited_logger("kvmeter.agent.kafka", 60.0)

DEFAULT_PROPERTIES: dict[str, Any] = {
    "message.timeout.ms": 0,  # infinite: the spool, not librdkafka, decides what is given up
    # A broker away for long is retried ever less often (doubling from 0.2 s up to 30 s): its
    # return is noticed within 30 s, and an outage of hours costs next to nothing meanwhile.
    "reconnect.backoff.ms": 200,
    "reconnect.backoff.max.ms": 30000,
    # librdkafka >= 2.10 re-bootstraps while no broker answers, making and ending a broker
    # thread several times a second for as long as the outage lasts (a third of the agent's
    # CPU then); the agent keeps to the brokers it knows (its bootstrap list and the cluster's).
    "metadata.recovery.strategy": "none",
    "linger.ms": 20,
    "compression.type": "lz4",
}
FORCED_PROPERTIES: dict[str, Any] = {"enable.idempotence": True, "acks": "all"}
# Defaults that older librdkafka releases do not know (Debian's and Ubuntu's): left out there.
NEWER_PROPERTIES = ("metadata.recovery.strategy",)


def producer_config(bootstrap: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    config = {"bootstrap.servers": bootstrap, **DEFAULT_PROPERTIES, **dict(extra or {})}
    config.update(FORCED_PROPERTIES)
    return config


def _confluent_producer(config: dict[str, Any], producer_class: Any = None) -> Any:
    """A Producer; a default property this librdkafka does not know yet is left out."""
    from confluent_kafka import KafkaException, Producer  # imported late: `--once` needs no Kafka

    make = producer_class or Producer
    try:
        return make(config)
    except KafkaException as exc:
        unknown = [name for name in NEWER_PROPERTIES if f'"{name}"' in str(exc) and name in config]
        if not unknown:
            raise
        log.info("librdkafka %s does not know %s: left out", _libversion(), ", ".join(unknown))
        return make({k: v for k, v in config.items() if k not in unknown})


def _libversion() -> str:
    from confluent_kafka import libversion

    return str(libversion()[0])


class Publisher:
    def __init__(
        self,
        spool: Spool,
        *,
        bootstrap: str,
        topic: str,
        key: str,
        properties: Mapping[str, Any] | None = None,
        max_in_flight: int = 1000,
        producer_factory: Callable[[dict[str, Any]], Any] = _confluent_producer,
        metrics: AgentMetrics | None = None,
    ) -> None:
        self.spool = spool
        self.topic = topic
        self.key = key.encode()
        self.max_in_flight = max_in_flight
        self.metrics = metrics
        self._config = producer_config(bootstrap, properties)
        # librdkafka's own errors (broker down, authentication) and logs, through Python logging
        self._config.setdefault("error_cb", self._on_client_error)
        self._config.setdefault("logger", KAFKA_LOG)
        self._factory = producer_factory
        self._producer = producer_factory(self._config)
        self._in_flight: dict[tuple[int, int], Frame] = {}
        self._next: tuple[int, int] = (0, 0)  # position of the next frame to produce
        self._failed = False
        self._generation = 0
        self.delivered = 0
        self.errors = 0
        self.last_error: str | None = None

    def pump(self) -> int:
        """Hand spooled frames to the producer, oldest first, up to max_in_flight. Returns how many."""
        if self._failed:
            self._rebuild()
        produced = 0
        if len(self._in_flight) >= self.max_in_flight:
            return 0  # librdkafka holds enough: the rest waits in the spool
        for frame in self.spool.pending_from(self._next):
            if len(self._in_flight) >= self.max_in_flight:
                break
            if frame.position in self._in_flight:
                continue
            try:
                self._producer.produce(
                    self.topic,
                    value=self.spool.read_batch(frame),
                    key=self.key,
                    on_delivery=functools.partial(self._delivered, self._generation, frame),
                )
            except BufferError:
                break  # librdkafka's queue is full: the rest waits in the spool
            except Exception as exc:  # refused outright, e.g. MSG_SIZE_TOO_LARGE: never crash the poll loop
                self._refused(frame, exc)
                break
            self._in_flight[frame.position] = frame
            self._next = (frame.segment, frame.offset + 1)
            produced += 1
        self._producer.poll(0)
        return produced

    def _refused(self, frame: Frame, exc: Exception) -> None:
        """The producer would not take a batch: it stays in the spool (counted in its depth and
        age) and is offered again at the next pump, after the operator fixes the cause."""
        self.errors += 1
        if self.metrics is not None:
            self.metrics.publish_errors.inc()
        if str(exc) != self.last_error:
            log.error(
                "the producer refused stream %s seq %d (%d bytes): %s; it stays in the spool "
                "(for MSG_SIZE_TOO_LARGE raise message.max.bytes in [kafka.properties] and on the broker)",
                frame.stream_id,
                frame.seq,
                frame.size,
                exc,
            )
        self.last_error = str(exc)

    def _delivered(self, generation: int, frame: Frame, err: Any, msg: Any) -> None:
        if generation != self._generation:
            return  # a purged message of a producer that was replaced
        self._in_flight.pop(frame.position, None)
        if err is None:
            self.delivered += 1
            self.spool.ack(frame)
            if self.metrics is not None:
                self.metrics.published.inc()
            return
        self.errors += 1
        self.last_error = str(err)
        if self.metrics is not None:
            self.metrics.publish_errors.inc()
        if not self._failed:
            log.warning(
                "delivery of stream %s seq %d failed: %s; re-sending from the spool",
                frame.stream_id,
                frame.seq,
                err,
            )
        self._failed = True

    def _on_client_error(self, err: Any) -> None:
        self.errors += 1
        self.last_error = str(err)
        if self.metrics is not None:
            self.metrics.publish_errors.inc()
        KAFKA_LOG.warning("kafka: %s (batches stay in the spool until the broker takes them)", err)

    def _rebuild(self) -> None:
        """Drop the producer and its queue; everything not acknowledged is produced again."""
        old = self._producer
        self._generation += 1
        try:
            old.purge()
            old.poll(0)
        except Exception as exc:  # a fatal producer may refuse even this
            log.debug("purging the old producer: %s", exc)
        self._producer = self._factory(self._config)
        self._in_flight.clear()
        self._next = (0, 0)
        self._failed = False

    def service(self, timeout: float) -> None:
        """Serve delivery callbacks for up to `timeout` seconds, then top the producer up."""
        self._producer.poll(timeout)
        self.pump()

    def in_flight(self) -> int:
        return len(self._in_flight)

    def flush(self, timeout: float) -> bool:
        """Deliver everything spooled within `timeout` seconds. True when nothing is left."""
        deadline = time.monotonic() + timeout
        while True:
            self.pump()
            if not self.spool.pending():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._producer.poll(min(left, 0.1))

    def close(self, timeout: float = 5.0) -> bool:
        done = self.flush(timeout)
        if not done:
            # Drop librdkafka's copies now (no waiting at exit): the spool has every one of them.
            self._generation += 1
            try:
                self._producer.purge()
                self._producer.poll(0)
            except Exception as exc:
                log.debug("purging at close: %s", exc)
            log.warning(
                "%d batches not delivered at exit; they stay in the spool and are re-sent at the next start",
                len(self.spool.pending()),
            )
        return done
