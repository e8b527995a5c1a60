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
from collections.abc import Callable, Mapping, Sequence
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
# While no broker has told whether the lifecycle topic exists (none reachable yet): ask again this
# often, briefly, so that the catch-up and the lifecycle start as soon as one answers.
REFRESH_UNKNOWN_EVERY_S = 5.0
UNKNOWN_METADATA_TIMEOUT_S = 1.0
RECHECK_UNREADABLE_EVERY_S = 5.0  # while the measures topic is unreadable: is it there again?
STATS_EVERY_MS = 2000
# librdkafka's log and the clients' errors: a broker outage is a line per distinct error a minute.
KAFKA_LOG = limited_logger("kvmeter.collector.kafka", 60.0)
QUIET_ERRORS = frozenset({KafkaError._TRANSPORT})
# The measures topic cannot be read at all (absent, or not ours to read): /health says so.
UNREADABLE = frozenset(
    {
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED,
    }
)


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
        self._lifecycle_known = False  # a broker told whether the lifecycle topic exists
        self.assigned: set[int] = set()  # measures partitions this replica owns now
        # Where each assigned measures partition starts for this assignment (its committed
        # offset), for the lag of a partition nothing was read from yet.
        self._starts: dict[tuple[str, int], int | None] = {}
        self._unreadable: tuple[float, str, int] | None = None  # since when, why, code (measures)
        self._last_recheck = float("-inf")
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
        """Partitions added (all of them under the eager protocol, after a revoke of all; the
        increment under the cooperative one)."""
        self.assigned |= {tp.partition for tp in partitions}
        for tp in partitions:
            self._starts.pop((tp.topic, tp.partition), None)
        if partitions:
            self._unreadable = None
        log.info("measures partitions assigned: %s (now %s)", sorted(tp.partition for tp in partitions),
                 sorted(self.assigned))  # fmt: skip

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Partitions taken away (or lost): their offsets committed, their lag no longer ours to
        tell (the new owner tells it; a stale value would keep the lag alert firing)."""
        self._commit(asynchronous=False)
        self.assigned -= {tp.partition for tp in partitions}
        for tp in partitions:
            self._starts.pop((tp.topic, tp.partition), None)
            try:
                self.metrics.lag.remove(tp.topic, str(tp.partition))
            except KeyError:
                pass

    def _refresh_lifecycle(self, timeout: float = 10) -> None:
        """Assign lifecycle partitions not yet assigned, from the beginning."""
        self._last_refresh = self.monotonic()
        topic = self.kafka.lifecycle_topic
        try:
            meta = self.lifecycle.list_topics(topic, timeout=timeout).topics.get(topic)
        except KafkaException as exc:
            log.warning("lifecycle topic %s: metadata unavailable: %s", topic, exc)
            return
        if meta is None or meta.error is not None:
            # A broker answered: the topic is absent (nothing to catch up with), or not ready.
            if meta is None or meta.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                self._lifecycle_known = True
            log.warning("lifecycle topic %s not available yet: %s", topic, meta.error if meta else "absent")
            return
        self._lifecycle_known = True
        new = sorted(set(meta.partitions) - self._lifecycle_parts)
        if new:
            self._lifecycle_parts.update(new)
            self.lifecycle.incremental_assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in new])

    def caught_up(self) -> bool:
        """The lifecycle topic read to its end. The end is the high watermark of the fetch
        responses (librdkafka's cached one), not a ListOffsets answer: Tansu answers that with
        the last record batch's first offset + 1. Never while no broker has said whether the
        topic exists (unreachable at start): its partitions are unknown, not none."""
        if not self._lifecycle_known:
            if self.monotonic() - self._last_refresh >= REFRESH_UNKNOWN_EVERY_S:
                self._refresh_lifecycle(UNKNOWN_METADATA_TIMEOUT_S)
            if not self._lifecycle_known:
                return False
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
        if self._unreadable is not None and now - self._last_recheck >= RECHECK_UNREADABLE_EVERY_S:
            self._recheck_measures_topic()
        if not self._lifecycle_known:
            if now - self._last_refresh >= REFRESH_UNKNOWN_EVERY_S:
                self._refresh_lifecycle(UNKNOWN_METADATA_TIMEOUT_S)
        elif now - self._last_refresh >= REFRESH_LIFECYCLE_EVERY_S:
            self._refresh_lifecycle()
        return out

    def _recheck_measures_topic(self) -> None:
        """The measures topic was reported absent: it is no longer once the cluster has it again
        (a replica with no partition of it, more replicas than partitions, reads nothing and is
        well)."""
        self._last_recheck = self.monotonic()
        if self._unreadable is None or self._unreadable[2] != KafkaError.UNKNOWN_TOPIC_OR_PART:
            return  # refused access: only an assignment or a record says it is over
        topic = self.kafka.measures_topic
        try:
            meta = self.lifecycle.list_topics(topic, timeout=UNKNOWN_METADATA_TIMEOUT_S).topics.get(topic)
        except KafkaException:
            return
        if meta is not None and meta.error is None and meta.partitions:
            self._unreadable = None

    def poll_lifecycle(self, timeout: float) -> list[Delivery]:
        messages = self._good(self.lifecycle.consume(num_messages=self.kafka.batch_size, timeout=timeout))
        if not messages:
            return []
        self.broker.seen(LIFECYCLE, reachable=True)
        return [Delivery(LIFECYCLE, _records(messages))]

    def poll_measures(self, timeout: float) -> list[Delivery]:
        messages = self._good(
            self.measures.consume(num_messages=self.kafka.batch_size, timeout=timeout), measures=True
        )
        if not messages:
            return []
        self._unreadable = None
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

    def _good(self, messages: list[Message], *, measures: bool = False) -> list[Message]:
        good = []
        for m in messages:
            err = m.error()
            if err is None:
                good.append(m)
            elif err.code() != KafkaError._PARTITION_EOF:
                KAFKA_LOG.warning("consumer error on %s: %s", m.topic(), err)
                if measures and err.code() in UNREADABLE and self._unreadable is None:
                    self._unreadable = (self.monotonic(), err.str(), err.code())
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
            assigned = self.measures.assignment()
            parts = [(self.measures, assigned, self._measures_starts(assigned))]
            topic = self.kafka.lifecycle_topic
            lifecycle = [TopicPartition(topic, p) for p in sorted(self._lifecycle_parts)]
            parts.append((self.lifecycle, lifecycle, {}))  # read from the beginning: starts at low
            for consumer, tps, starts in parts:
                if not tps:
                    continue
                for tp, behind in _behind(consumer, tps, starts).items():
                    if behind is not None:
                        self.metrics.lag.labels(tp[0], str(tp[1])).set(behind)
        except KafkaException as exc:
            log.debug("lag unavailable: %s", exc)

    def _measures_starts(self, assigned: list[TopicPartition]) -> dict[tuple[str, int], int | None]:
        """The committed offset of each assigned partition nothing was read from yet in this
        assignment (where its consumption starts), asked of the broker once per assignment."""
        unread = [
            tp for tp in self.measures.position(assigned)
            if tp.offset < 0 and (tp.topic, tp.partition) not in self._starts
        ]  # fmt: skip
        if unread:
            for tp in self.measures.committed(unread, timeout=2):
                self._starts[(tp.topic, tp.partition)] = tp.offset if tp.offset >= 0 else None
        return self._starts

    def status(self) -> dict[str, Any]:
        return {
            "measures_partitions": sorted(self.assigned),
            "lifecycle_partitions": sorted(self._lifecycle_parts),
            "degraded": self.broker.degraded() or self._unreadable_reason(),
            "broker": self.broker.status(),
        }

    def _unreadable_reason(self) -> str:
        """Why the measures topic cannot be read, once that has lasted degraded_after_s ("")."""
        if self._unreadable is None:
            return ""
        since, why, _code = self._unreadable
        down = self.monotonic() - since
        if down < self.kafka.degraded_after_s:
            return ""
        return (
            f"measures topic {self.kafka.measures_topic} not readable for {down:.0f} s "
            f"(limit {self.kafka.degraded_after_s:g} s): {why}"
        )

    def close(self) -> None:
        self._commit(asynchronous=False)
        self.measures.close()
        self.lifecycle.close()


def _behind(
    consumer: Consumer,
    parts: list[TopicPartition],
    starts: Mapping[tuple[str, int], int | None] | None = None,
) -> dict[tuple[str, int], int | None]:
    """Messages between each partition's position and its end as the last fetch response told
    it; None while no fetch response has told it yet. A partition nothing was read from yet in
    this assignment is at its start (`starts`: the committed offset), else at its low end."""
    out: dict[tuple[str, int], int | None] = {}
    for tp in consumer.position(parts):
        low, high = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), cached=True)
        if high < 0:  # OFFSET_INVALID: not fetched yet
            out[(tp.topic, tp.partition)] = None
            continue
        if tp.offset >= 0:
            position = tp.offset
        else:  # nothing consumed yet
            start = (starts or {}).get((tp.topic, tp.partition))
            position = start if start is not None else max(low, 0)
        out[(tp.topic, tp.partition)] = max(0, high - position)
    return out
