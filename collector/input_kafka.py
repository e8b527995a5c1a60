"""Kafka input: CloudStack's event bus and the agents' measure batches from one broker.

- Measures: one consumer group shared by the replicas; auto commit and auto offset store are
  off, and a delivery's offsets are stored and committed only when it is acknowledged, after the
  database transaction committed. A crash in between re-delivers, and the stream marks make the
  re-delivery change nothing.
- Lifecycle: every replica reads the whole topic from the beginning (partitions assigned by
  hand, no shared group); the store dedupes events by their digest. Nothing to acknowledge.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, TopicPartition

from kvmeter.collector.broker_watch import BrokerWatch
from kvmeter.collector.config import KafkaConfig
from kvmeter.collector.inputs import LIFECYCLE, MEASURES, Delivery
from kvmeter.collector.metrics import Metrics
from kvmeter.collector.model import Record
from kvmeter.log_limit import limited_logger

log = logging.getLogger(__name__)

LAG_EVERY_S = 5.0
REFRESH_LIFECYCLE_EVERY_S = 60.0
STATS_EVERY_MS = 2000
# librdkafka's log and the clients' errors: a broker outage is a line per distinct error a minute.
KAFKA_LOG = limited_logger("kvmeter.collector.kafka", 60.0)
QUIET_ERRORS = frozenset({KafkaError._TRANSPORT})


def _origin(msg: Message) -> str:
    return f"{msg.topic()}/{msg.partition()}@{msg.offset()}"


def _records(messages: Sequence[Message]) -> list[Record]:
    return [
        Record(m.value() or b"", m.key(), _origin(m), (f"{m.topic()}/{m.partition()}", m.offset() or 0))
        for m in messages
    ]


class KafkaInput:
    def __init__(
        self,
        kafka: KafkaConfig,
        metrics: Metrics,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        self.kafka = kafka
        self.metrics = metrics
        self.monotonic = monotonic
        self.broker = BrokerWatch(kafka.degraded_after_s, monotonic)
        common: dict[str, Any] = {
            "bootstrap.servers": kafka.bootstrap,
            "statistics.interval.ms": STATS_EVERY_MS,  # broker states for self.broker
            "logger": KAFKA_LOG,
            **kafka.options,
        }
        self.measures = Consumer(
            {
                **common,
                **self._callbacks(MEASURES),
                "group.id": kafka.group,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
            }
        )
        # A private group id: librdkafka wants one, but nothing is ever committed under it.
        self.lifecycle = Consumer(
            {
                **common,
                **self._callbacks(LIFECYCLE),
                "group.id": f"{kafka.group}.lifecycle.{uuid.uuid4().hex[:12]}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
            }
        )
        self._lifecycle_parts: set[int] = set()
        self.assigned: set[int] = set()  # measures partitions this replica owns now
        self._last_lag = float("-inf")
        self._last_refresh = float("-inf")

    def _callbacks(self, client: str) -> dict[str, Any]:
        def on_error(err: KafkaError) -> None:
            self.broker.on_error(client, err.name(), err.str())
            if err.code() not in QUIET_ERRORS:  # those are in librdkafka's own log lines already
                KAFKA_LOG.warning("%s consumer: %s", client, err)

        return {"error_cb": on_error, "stats_cb": lambda stats: self.broker.on_stats(client, stats)}

    # -- setup --------------------------------------------------------------------------------
    def start(self) -> None:
        self.measures.subscribe(
            [self.kafka.measures_topic], on_assign=self._on_assign, on_revoke=self._on_revoke
        )
        self._refresh_lifecycle()

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assigned = {tp.partition for tp in partitions}
        log.info("measures partitions assigned: %s", sorted(self.assigned))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._commit(asynchronous=False)
        self.assigned = set()

    def _refresh_lifecycle(self) -> None:
        """Assign lifecycle partitions not yet assigned, from the beginning."""
        self._last_refresh = self.monotonic()
        topic = self.kafka.lifecycle_topic
        try:
            meta = self.lifecycle.list_topics(topic, timeout=10).topics.get(topic)
        except KafkaException as exc:
            log.warning("lifecycle topic %s: metadata unavailable: %s", topic, exc)
            return
        if meta is None or meta.error is not None:
            log.warning("lifecycle topic %s not available yet: %s", topic, meta.error if meta else "absent")
            return
        new = sorted(set(meta.partitions) - self._lifecycle_parts)
        if new:
            self._lifecycle_parts.update(new)
            self.lifecycle.incremental_assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in new])

    def caught_up(self) -> bool:
        """The lifecycle topic read to its end. The end is the high watermark of the fetch
        responses (librdkafka's cached one), not a ListOffsets answer: Tansu answers that with
        the last record batch's first offset + 1."""
        parts = [TopicPartition(self.kafka.lifecycle_topic, p) for p in sorted(self._lifecycle_parts)]
        return all(behind == 0 for behind in _behind(self.lifecycle, parts).values())

    # -- deliveries ---------------------------------------------------------------------------
    def poll(self, timeout: float, *, measures: bool = True) -> list[Delivery]:
        """Lifecycle records first (without waiting when measures are wanted too), then measures."""
        out = self.poll_lifecycle(0 if measures else timeout)
        if measures:
            out += self.poll_measures(timeout)
        now = self.monotonic()
        if now - self._last_lag >= LAG_EVERY_S:
            self._last_lag = now
            self.update_lag()
        if now - self._last_refresh >= REFRESH_LIFECYCLE_EVERY_S:
            self._refresh_lifecycle()
        return out

    def poll_lifecycle(self, timeout: float) -> list[Delivery]:
        messages = self._good(self.lifecycle.consume(num_messages=self.kafka.batch_size, timeout=timeout))
        if not messages:
            return []
        self.broker.seen(LIFECYCLE, reachable=True)
        return [Delivery(LIFECYCLE, _records(messages))]

    def poll_measures(self, timeout: float) -> list[Delivery]:
        messages = self._good(self.measures.consume(num_messages=self.kafka.batch_size, timeout=timeout))
        if not messages:
            return []
        self.broker.seen(MEASURES, reachable=True)
        return [Delivery(MEASURES, _records(messages), lambda: self._acknowledge(messages))]

    def _acknowledge(self, messages: Sequence[Message]) -> None:
        """Store and commit the next offset of every partition in the chunk."""
        last: dict[tuple[str, int], int] = {}
        for m in messages:
            key = (m.topic() or "", m.partition() or 0)
            last[key] = max(last.get(key, -1), m.offset() or 0)
        offsets = [TopicPartition(t, p, o + 1) for (t, p), o in sorted(last.items())]
        try:
            self.measures.store_offsets(offsets=offsets)
        except KafkaException as exc:  # partition revoked meanwhile: the new owner re-applies nothing
            log.info("offsets not stored (%s); the stream marks cover re-delivery", exc)
        self._commit(asynchronous=True)

    def _good(self, messages: list[Message]) -> list[Message]:
        good = []
        for m in messages:
            err = m.error()
            if err is None:
                good.append(m)
            elif err.code() != KafkaError._PARTITION_EOF:
                KAFKA_LOG.warning("consumer error on %s: %s", m.topic(), err)
        return good

    def _commit(self, *, asynchronous: bool) -> None:
        try:
            if asynchronous:
                self.measures.commit(asynchronous=True)
            else:
                self.measures.commit(asynchronous=False)
        except KafkaException as exc:
            if exc.args and getattr(exc.args[0], "code", lambda: None)() != KafkaError._NO_OFFSET:
                log.info("offset commit failed (%s); re-delivery is harmless", exc)

    def update_lag(self) -> None:
        """Messages behind the end, per measures partition this replica holds and per lifecycle
        partition (ends from fetch responses: see caught_up)."""
        try:
            parts = [(self.measures, self.measures.assignment())]
            topic = self.kafka.lifecycle_topic
            parts.append((self.lifecycle, [TopicPartition(topic, p) for p in sorted(self._lifecycle_parts)]))
            for consumer, assigned in parts:
                if not assigned:
                    continue
                for tp, behind in _behind(consumer, assigned).items():
                    if behind is not None:
                        self.metrics.lag.labels(tp[0], str(tp[1])).set(behind)
        except KafkaException as exc:
            log.debug("lag unavailable: %s", exc)

    def status(self) -> dict[str, Any]:
        return {
            "measures_partitions": sorted(self.assigned),
            "lifecycle_partitions": sorted(self._lifecycle_parts),
            "degraded": self.broker.degraded(),
            "broker": self.broker.status(),
        }

    def close(self) -> None:
        self._commit(asynchronous=False)
        self.measures.close()
        self.lifecycle.close()


def _behind(consumer: Consumer, parts: list[TopicPartition]) -> dict[tuple[str, int], int | None]:
    """Messages between each partition's position and its end as the last fetch response told
    it; None while no fetch response has told it yet."""
    out: dict[tuple[str, int], int | None] = {}
    for tp in consumer.position(parts):
        low, high = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), cached=True)
        if high < 0:  # OFFSET_INVALID: not fetched yet
            out[(tp.topic, tp.partition)] = None
            continue
        position = tp.offset if tp.offset >= 0 else max(low, 0)  # nothing consumed yet
        out[(tp.topic, tp.partition)] = max(0, high - position)
    return out
