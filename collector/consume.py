"""The live consumer: Kafka in, the service's transactions, offsets out.

- Measures: one consumer group shared by the replicas; auto commit and auto offset store are
  off, and offsets are stored and committed only after the database transaction committed. A
  crash in between re-delivers, and the stream marks make the re-delivery change nothing.
- Lifecycle: every replica reads the whole topic from the beginning (partitions assigned by
  hand, no shared group); the store dedupes events by their digest.
- A poison message is dead-lettered by the service (inside the same transaction as its
  chunk) and consumption moves on. A failing database is retried in place with backoff.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, TopicPartition

from kvmeter.collector.broker_watch import BrokerWatch
from kvmeter.collector.config import KafkaConfig
from kvmeter.collector.log_limit import limited_logger
from kvmeter.collector.metrics import Metrics
from kvmeter.collector.service import Collector, Outcome, Record

log = logging.getLogger(__name__)

LAG_EVERY_S = 5.0
# Crash tests kill the process at the most delicate instant: after a measures transaction
# committed, before its offsets are stored. "after-db-commit:N" fires on the Nth commit.
FAILPOINT = "KVMETER_FAILPOINT"
REFRESH_LIFECYCLE_EVERY_S = 60.0
STATS_EVERY_MS = 2000
MEASURES, LIFECYCLE = "measures", "lifecycle"
# librdkafka's log and the clients' errors: a broker outage is a line per distinct error a minute.
KAFKA_LOG = limited_logger("kvmeter.collector.kafka", 60.0)
QUIET_ERRORS = frozenset({KafkaError._TRANSPORT})


def _origin(msg: Message) -> str:
    return f"{msg.topic()}/{msg.partition()}@{msg.offset()}"


def _records(messages: Sequence[Message]) -> list[Record]:
    return [Record(m.value() or b"", m.key(), _origin(m)) for m in messages]


class LiveConsumer:
    def __init__(
        self,
        collector: Collector,
        kafka: KafkaConfig,
        metrics: Metrics,
        *,
        tick_seconds: float = 30.0,
        poll_timeout: float = 0.5,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        self.collector = collector
        self.kafka = kafka
        self.metrics = metrics
        self.tick_seconds = tick_seconds
        self.poll_timeout = poll_timeout
        self.monotonic = monotonic
        self.stop_event = threading.Event()
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
        self.failing = ""  # the stage being retried and why, "" when all is well
        self.last_success = self.monotonic()
        self._last_tick = float("-inf")
        self._last_lag = float("-inf")
        self._last_refresh = float("-inf")
        self.totals = Outcome()
        self._commits = 0
        point = os.environ.get(FAILPOINT, "")
        self._kill_after = int(point.split(":", 1)[1]) if point.startswith("after-db-commit:") else 0

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

    def catch_up_lifecycle(self, timeout_s: float = 60.0) -> None:
        """Read the lifecycle topic to its current end before measures (fewer parked measures).

        The end is the high watermark of the fetch responses (librdkafka's cached one), not a
        ListOffsets answer: Tansu answers that with the last record batch's first offset + 1.
        """
        deadline = self.monotonic() + timeout_s
        parts = [TopicPartition(self.kafka.lifecycle_topic, p) for p in sorted(self._lifecycle_parts)]
        while parts and self.monotonic() < deadline and not self.stop_event.is_set():
            self._consume_lifecycle(self.poll_timeout)
            if all(behind == 0 for behind in _behind(self.lifecycle, parts).values()):
                break
        # What is known now (histories, owner index) lives as long as the consumer: set it apart,
        # or every full garbage collection, triggered by the objects each chunk makes, walks it again.
        gc.collect()
        gc.freeze()

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> None:
        self.start()
        self.catch_up_lifecycle()
        try:
            while not self.stop_event.is_set():
                self.step()
        finally:
            self.close()

    def step(self) -> None:
        self._consume_lifecycle(0)
        self._consume_measures(self.poll_timeout)
        now = self.monotonic()
        if now - self._last_tick >= self.tick_seconds:
            self._last_tick = now
            self._retrying("tick", self.collector.tick)
        if now - self._last_lag >= LAG_EVERY_S:
            self._last_lag = now
            self._update_lag()
        if now - self._last_refresh >= REFRESH_LIFECYCLE_EVERY_S:
            self._refresh_lifecycle()

    def _consume_lifecycle(self, timeout: float) -> None:
        messages = self._good(self.lifecycle.consume(num_messages=self.kafka.batch_size, timeout=timeout))
        if messages:
            self.broker.seen(LIFECYCLE, reachable=True)
            records = _records(messages)
            self._retrying("lifecycle", lambda: self.collector.apply_events(records))

    def _consume_measures(self, timeout: float) -> None:
        messages = self._good(self.measures.consume(num_messages=self.kafka.batch_size, timeout=timeout))
        if not messages:
            return
        self.broker.seen(MEASURES, reachable=True)
        records = _records(messages)
        self._retrying("measures", lambda: self.collector.apply_batches(records))
        self._commits += 1
        if self._commits == self._kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        # Only now, after the commit: the next offset of every partition in the chunk.
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

    def _retrying(self, stage: str, work: Callable[[], Outcome]) -> None:
        """Run one transaction-backed step until it succeeds (or we are stopped)."""
        delay = 0.2
        while True:
            try:
                out = work()
            except Exception as exc:
                if self.stop_event.is_set():
                    raise
                self.failing = f"{stage}: {type(exc).__name__}"
                self.metrics.errors.labels(stage).inc()
                log.exception("%s: failed, retrying in %.1fs", stage, delay)
                self.stop_event.wait(delay)
                delay = min(delay * 2, 30.0)
                continue
            self.failing = ""
            self.last_success = self.monotonic()
            self.metrics.record(out)
            self.totals.add(out)
            self.totals.dead_letters.clear()  # counted in metrics; kept in the store
            for letter in out.dead_letters:
                log.warning(
                    "dead-lettered %s %s: %s: %s", letter.source, letter.origin, letter.reason, letter.message
                )
            return

    def _commit(self, *, asynchronous: bool) -> None:
        try:
            if asynchronous:
                self.measures.commit(asynchronous=True)
            else:
                self.measures.commit(asynchronous=False)
        except KafkaException as exc:
            if exc.args and getattr(exc.args[0], "code", lambda: None)() != KafkaError._NO_OFFSET:
                log.info("offset commit failed (%s); re-delivery is harmless", exc)

    def _update_lag(self) -> None:
        """Messages behind the end, per measures partition this replica holds and per lifecycle
        partition (ends from fetch responses: see catch_up_lifecycle)."""
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
        """For /health: what this replica's consumer is doing."""
        return {
            "measures_partitions": sorted(self.assigned),
            "lifecycle_partitions": sorted(self._lifecycle_parts),
            "failing": self.failing,
            "degraded": self.broker.degraded(),
            "broker": self.broker.status(),
            "seconds_since_success": round(self.monotonic() - self.last_success, 1),
        }

    def stop(self) -> None:
        self.stop_event.set()

    def close(self) -> None:
        gc.unfreeze()
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
