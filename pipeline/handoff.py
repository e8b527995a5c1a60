"""The all-in-one hand-off: a stand-in for the agent's Kafka producer that gives each batch
straight to an in-process collector.

It keeps the spool's guarantee: the agent's publisher acknowledges a spooled batch only from
the delivery callback, and this producer calls it only after the collector's transaction that
applied the batch has committed. A failed apply reports an error, so the publisher re-sends the
batch from the spool later under its original stream id and sequence number, and the collector's
stream marks make a re-sent batch that did commit change nothing.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from kvmeter.collector.model import Outcome
from kvmeter.collector.service import MEASURES, Collector

log = logging.getLogger(__name__)

DeliveryCallback = Callable[[Any, Any], None]


class HandoffError(Exception):
    """The in-process collector could not apply a batch (stands in for a KafkaError)."""


class HandedOff:
    """What the delivery callback receives as its message."""

    def __init__(self, topic: str, key: bytes | None, value: bytes):
        self._topic, self._key, self._value = topic, key, value

    def topic(self) -> str:
        return self._topic

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes:
        return self._value


class InProcessProducer:
    """The subset of confluent_kafka.Producer the agent's Publisher uses."""

    def __init__(
        self,
        collector: Collector,
        *,
        idle: Callable[[], None] | None = None,
        max_queue: int = 1000,
        applied: Callable[[Outcome], None] | None = None,
        failed: Callable[[str, Exception], None] | None = None,
    ):
        self.collector = collector
        self.idle = idle  # the rest of the collector's work, run on this same thread
        self.max_queue = max_queue
        # What each apply did, or why it failed: the metrics and /health the feeder's loop
        # feeds for the rest of the collector's work (Feeder.applied, .failed).
        self.applied = applied
        self.failed = failed
        self._queue: deque[tuple[HandedOff, DeliveryCallback | None]] = deque()

    def produce(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        on_delivery: DeliveryCallback | None = None,
    ) -> None:
        if len(self._queue) >= self.max_queue:
            raise BufferError("in-process hand-off queue is full")
        self._queue.append((HandedOff(topic, key, value), on_delivery))

    def poll(self, timeout: float = 0) -> int:
        """Apply queued batches in order (each callback runs after its batch committed), do the
        idle work, then wait out what is left of `timeout`: the agent's loop paces itself on it."""
        deadline = time.monotonic() + timeout
        served = self._apply()
        if self.idle is not None:
            self.idle()
        left = deadline - time.monotonic()
        if left > 0:
            time.sleep(left)
        return served

    def _apply(self) -> int:
        served = 0
        while self._queue:
            message, callback = self._queue.popleft()
            try:
                out = self.collector.apply_batch(message.value(), origin=f"handoff:{message.topic()}")
                error: HandoffError | None = None
            except Exception as exc:  # the store is down, the disk is full, ...
                log.error("collector could not apply a batch, it stays in the agent's spool: %s", exc)
                error = HandoffError(str(exc))
                if self.failed is not None:
                    self.failed(MEASURES, exc)
            else:
                if self.applied is not None:
                    self.applied(out)
            if callback is not None:
                callback(error, message)
            served += 1
            if error is not None:
                break  # keep order: the publisher re-sends from the failed batch on
        return served

    def flush(self, timeout: float = 0) -> int:
        self._apply()
        return len(self._queue)

    def purge(self) -> None:
        self._queue.clear()

    def __len__(self) -> int:
        return len(self._queue)
