"""One collector replica for the throughput benchmark: kvmeter's loop over its Kafka input (consumer group,
lifecycle catch-up, one transaction per chunk, offsets after commit) over a store, until SIGTERM.

Prints one JSON object at exit: when it applied its first measures chunk and when its last
chunk with new batches committed (wall clock, so replicas can be combined), the process CPU
seconds in between, its totals, and the size and time of every measures chunk (the rate depends
on how many batches a chunk holds).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from tests.harness.kafka import FAST_GROUP

from kvmeter.collector.config import KafkaConfig
from kvmeter.collector.feed import Feeder
from kvmeter.collector.input_kafka import KafkaInput
from kvmeter.collector.metrics import Metrics
from kvmeter.collector.model import Outcome, Record, Settings
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", required=True)
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--measures-topic", required=True)
    ap.add_argument("--lifecycle-topic", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--ready", default=None, help="file to keep the count of measure partitions held in")
    ap.add_argument("--expect-events", type=int, default=0, help="lifecycle records to read before ready")
    ap.add_argument(
        "--preload-events", type=int, default=0, help="only apply this many lifecycle records, then exit"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    store = Store(args.db)
    store.migrate()
    collector = Collector(store, Settings(), clock=lambda: time.time_ns() // 1_000_000)
    kafka = KafkaConfig(
        bootstrap=args.bootstrap,
        measures_topic=args.measures_topic,
        lifecycle_topic=args.lifecycle_topic,
        group=args.group,
        batch_size=args.batch_size,
        options=dict(FAST_GROUP),
    )
    metrics = Metrics()
    kafka_input = KafkaInput(kafka, metrics)
    consumer = Feeder(collector, [kafka_input], metrics)
    seen: dict[str, Any] = {"first_wall": None, "first_cpu": None, "last_wall": None, "last_cpu": None}
    real_apply = collector.apply_batches
    real_events = collector.apply_events
    in_window = [0.0]  # seconds spent on lifecycle records between first and last measures chunk
    chunks: list[tuple[int, int, float]] = []  # (records, new batches, seconds) per measures chunk

    def apply_events(records: Any, within: Any = None) -> Any:
        t0 = time.time()
        out = real_events(records, within=within)
        if seen["first_wall"] is not None:
            in_window[0] += time.time() - t0
        return out

    def apply_batches(records: Any) -> Any:
        t0 = time.time()
        if seen["first_wall"] is None:
            seen["first_wall"], seen["first_cpu"] = time.time(), time.process_time()
        out = real_apply(records)
        chunks.append((len(records), out.batches, round(time.time() - t0, 4)))
        if out.batches:
            seen["last_wall"], seen["last_cpu"] = time.time(), time.process_time()
        return out

    collector.apply_batches = apply_batches  # type: ignore[method-assign]
    collector.apply_events = apply_events  # type: ignore[method-assign]

    def stop(*_: Any) -> None:
        print(f"{time.time():.3f} SIGTERM", file=sys.stderr, flush=True)
        consumer.stop()

    signal.signal(signal.SIGTERM, stop)
    if args.preload_events:
        t = preload(collector, args.bootstrap, args.lifecycle_topic, args.preload_events)
        consumer.close()
    else:
        run(consumer, kafka_input, args.ready, args.expect_events)
        print(f"{time.time():.3f} closed", file=sys.stderr, flush=True)
        t = consumer.totals
    store.close()
    busy_cpu = (seen["last_cpu"] - seen["first_cpu"]) if seen["last_cpu"] is not None else None
    json.dump(
        {
            "first_apply_wall": seen["first_wall"],
            "last_commit_wall": seen["last_wall"],
            "busy_cpu_s": busy_cpu,
            "batches": t.batches,
            "measures": t.measures,
            "duplicates": t.duplicates,
            "parked": t.parked,
            "events": t.events,
            "known_events": t.known_events,
            "billed_bytes": t.billed_bytes,
            "lifecycle_s_in_window": in_window[0],
            "chunks": chunks,
        },
        sys.stdout,
    )
    return 0


def run(consumer: Feeder, kafka_input: KafkaInput, ready: str | None, expect_events: int) -> None:
    """Feeder.run(), reporting readiness: once this replica holds measure partitions and has
    read the whole lifecycle topic, it writes how many partitions it holds to `ready` (kept
    current), so that the benchmark produces the measures only when every replica is in place."""
    consumer.start()
    consumer.catch_up()
    held = -1
    try:
        while not consumer.stop_event.is_set():
            consumer.step()
            if ready:
                t = consumer.totals
                caught_up = t.events + t.known_events >= expect_events
                parts = len(kafka_input.measures.assignment()) if caught_up else 0
                if parts != held:
                    Path(f"{ready}.tmp").write_text(str(parts))
                    os.replace(f"{ready}.tmp", ready)
                    held = parts
    finally:
        consumer.close()


def preload(collector: Collector, bootstrap: str, topic: str, expect: int) -> Outcome:
    """Apply the lifecycle topic's first `expect` records through the service, as the live consumer
    does, reading until the count is reached (Tansu's high watermark is not reliable)."""
    from confluent_kafka import Consumer, TopicPartition

    plain = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"preload-{topic}", "enable.auto.commit": False}
    )
    plain.assign([TopicPartition(topic, 0, 0)])
    total = Outcome()
    seen = 0
    deadline = time.monotonic() + 900
    while seen < expect:
        if time.monotonic() > deadline:
            raise SystemExit(f"lifecycle preload: {seen} of {expect} records after 900 s")
        messages = [m for m in plain.consume(num_messages=1000, timeout=1.0) if m.error() is None]
        if messages:
            seen += len(messages)
            total.add(collector.apply_events([Record(m.value() or b"", m.key()) for m in messages]))
    plain.close()
    return total


if __name__ == "__main__":
    raise SystemExit(main())
