"""The history the Kafka topics keep: read whole for a rebuild, and checked against the rebuild
horizon at the collector's start.

    read_topic(kafka, topic)           chunks of a topic's records, from the earliest retained
                                       offset of every partition to its end (a private consumer)
    check_horizon(kafka, metrics)      warn (log line + gauge) when the measures topic keeps less
                                       history than [kafka] rebuild_horizon_days

The reader's consumer has a group id of its own and never commits: the live group's offsets
stay as they are. The end of a partition is librdkafka's partition EOF (the high watermark of
the fetch responses), not a ListOffsets answer: Tansu answers that with the last record batch's
first offset + 1.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

from kvmeter.collector.config import KafkaConfig
from kvmeter.collector.input_kafka import KAFKA_LOG
from kvmeter.collector.metrics import Metrics

log = logging.getLogger(__name__)

DAY_MS = 86_400_000
STALLED_S = 60.0  # no record and no end of partition for this long: the broker is gone


class HistoryError(RuntimeError):
    """A topic could not be read to its end."""


def read_topic(
    kafka: KafkaConfig,
    topic: str,
    *,
    chunk: int = 1000,
    stalled_s: float = STALLED_S,
    monotonic: Callable[[], float] = time.monotonic,
) -> Iterator[list[Message]]:
    """Every retained record of `topic`, partition by partition in offset order, in chunks."""
    consumer = Consumer(
        {
            "bootstrap.servers": kafka.bootstrap,
            "logger": KAFKA_LOG,
            **kafka.options,
            "group.id": f"{kafka.group}.rebuild.{uuid.uuid4().hex[:12]}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
        }
    )
    try:
        try:
            meta = consumer.list_topics(topic, timeout=15).topics.get(topic)
        except KafkaException as exc:
            raise HistoryError(f"topic {topic}: metadata unavailable: {exc}") from None
        if meta is None or meta.error is not None:
            raise HistoryError(f"topic {topic}: {meta.error if meta else 'absent'}")
        pending = set(meta.partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(pending)])
        last_progress = monotonic()
        while pending:
            messages = consumer.consume(num_messages=chunk, timeout=1.0)
            good = []
            for m in messages:
                err = m.error()
                if err is None:
                    good.append(m)
                elif err.code() == KafkaError._PARTITION_EOF:
                    pending.discard(m.partition() or 0)
                else:
                    KAFKA_LOG.warning("reading %s: %s", topic, err)
            if messages:
                last_progress = monotonic()
            elif monotonic() - last_progress > stalled_s:
                raise HistoryError(f"topic {topic}: partitions {sorted(pending)} not read to their end")
            if good:
                yield good
    finally:
        consumer.close()


def check_horizon(kafka: KafkaConfig, metrics: Metrics, *, timeout: float = 15.0) -> str:
    """Compare the measures topic's retention with the rebuild horizon; the warning ("" when
    none). The gauges say the same for alerting."""
    topic = kafka.measures_topic
    horizon_ms = kafka.rebuild_horizon_days * DAY_MS
    try:
        configs = _topic_config(kafka, topic, timeout)
    except Exception as exc:  # the live loop goes on; the check is advice
        log.warning("measures topic %s: retention unknown (%s); cannot check the rebuild horizon", topic, exc)
        return ""
    retention = _int(configs.get("retention.ms"))
    metrics.topic_retention.labels(topic).set(-1 if retention is None or retention < 0 else retention / 1000)
    problems = []
    if retention is not None and 0 <= retention < horizon_ms:
        problems.append(
            f"keeps {retention / DAY_MS:g} day(s) of history (retention.ms {retention}), less than the "
            f"rebuild horizon of {kafka.rebuild_horizon_days} day(s)"
        )
    if "compact" in (configs.get("cleanup.policy") or ""):
        problems.append("is compacted (cleanup.policy compact): a rebuild would miss batches")
    metrics.history_short.labels(topic).set(1 if problems else 0)
    if not problems:
        shown = "unbounded" if retention is None or retention < 0 else f"{retention / DAY_MS:g} day(s)"
        log.info("measures topic %s keeps %s of history (rebuild horizon %d day(s))", topic, shown,
                 kafka.rebuild_horizon_days)  # fmt: skip
        return ""
    warning = (
        f"measures topic {topic} " + " and ".join(problems) + ": `kvmeter rebuild` cannot replay what "
        "the topic no longer holds; raise the topic's retention.ms or lower [kafka] rebuild_horizon_days"
    )
    log.warning("%s", warning)
    return warning


def _topic_config(kafka: KafkaConfig, topic: str, timeout: float) -> dict[str, str | None]:
    conf: dict[str, Any] = {
        "bootstrap.servers": kafka.bootstrap,
        "logger": KAFKA_LOG,
        **_admin_options(kafka),
    }
    admin = AdminClient(conf)
    futures = admin.describe_configs([ConfigResource(ResourceType.TOPIC, topic)], request_timeout=timeout)
    entries = next(iter(futures.values())).result(timeout=timeout)
    return {name: entry.value for name, entry in entries.items()}


def _admin_options(kafka: KafkaConfig) -> dict[str, Any]:
    """The [kafka] options a client of any kind takes (security, ...), not the consumer's own."""
    consumer_only = ("session.timeout.ms", "heartbeat.interval.ms", "auto.offset.reset", "enable.auto.commit",
                     "max.poll.interval.ms", "fetch.", "group.", "partition.assignment.strategy")  # fmt: skip
    return {k: v for k, v in kafka.options.items() if not k.startswith(consumer_only)}


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
