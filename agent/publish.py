"""Publish spooled batches to Kafka in order; the broker's acknowledgement advances the spool.

The producer is idempotent (acks=all, no duplicates from its own retries) and never gives up on a
message by itself (message.timeout.ms=0: infinite), so a broker that is away for minutes only
makes the spool grow; librdkafka delivers in order once it is back. If a delivery still fails
(a fatal producer error, a purge), the producer is rebuilt and every unacknowledged frame is
produced again from the spool, under its original stream id and sequence number.

A producer can also get stuck without any error reaching the application: a broker that lost
its producer state (restarted without its data, or producer ids expired) answers every produce
with UNKNOWN_PRODUCER_ID, and librdkafka bumps the epoch and retries, forever. librdkafka's
statistics show it (the epoch climbs while nothing is delivered); the publisher then rebuilds
the producer too, which asks the broker for a new producer id. Rebuilds back off (1 s doubling to
60 s) while nothing gets delivered, so a cause a new producer does not cure (a batch the broker
refuses as too large, a missing topic) costs a rebuild a minute, not a busy loop.

Not thread-safe: delivery callbacks run inside `service()`/`flush()` on the caller's thread.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from kvmeter.agent.kafka_client import (
    KAFKA_LOG,
    MSG_SIZE_TOO_LARGE,
    confluent_producer,
    error_code,
    is_fatal,
    producer_config,
    producer_identity,
)
from kvmeter.agent.metrics import AgentMetrics
from kvmeter.agent.spool import Frame, Spool
from kvmeter.log_limit import limited_logger

log = logging.getLogger(__name__)
# A producer re-created: one line per kind of cause per minute, however often it happens.
RECOVERY_LOG = limited_logger("kvmeter.agent.publish.recovery", 60.0)

# Epoch bumps without a delivery in between that mean the broker does not know the producer id
# (one bump is librdkafka's normal recovery from an expired id; a broker that lost the id makes
# it bump about ten times a second).
STUCK_EPOCH_BUMPS = 3
REBUILD_BACKOFF_S = (1.0, 60.0)  # first and longest wait between two rebuilds without a delivery
# Batches handed over and nothing delivered for this long: the broker is away (see stalled()).
STALLED_AFTER_S = 5.0
# In flight while nothing was delivered in the last STALLED_AFTER_S (a broker away, a producer
# just made): enough to find out when the broker answers; the rest waits in the spool, which
# keeps it anyway, instead of a copy of every batch of an outage in librdkafka's queue.
PROBE_IN_FLIGHT = 8


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
        producer_factory: Callable[[dict[str, Any]], Any] | None = None,  # None: librdkafka's
        metrics: AgentMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
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
        self._config.setdefault("stats_cb", self._on_stats)
        self._factory = producer_factory or confluent_producer
        self._clock = clock
        self._producer = self._factory(self._config)
        self._in_flight: dict[tuple[int, int], Frame] = {}
        self._next: tuple[int, int] = (0, 0)  # position of the next frame to produce
        self._failed: str | None = None  # why the producer must be rebuilt (None: it is fine)
        self._generation = 0
        self._rebuild_wait = REBUILD_BACKOFF_S[0]
        self._rebuild_at = 0.0  # monotonic time before which no rebuild happens
        # (producer id, epoch) at the last statistics report after a delivery
        self._epoch_mark: tuple[int, int] | None = None
        self._delivered_since_stats = False
        # Since when batches have been in flight with nothing delivered (None: none in flight)
        self._waiting_since: float | None = None
        self._delivered_at: float | None = None  # monotonic time of the last delivery
        self.delivered = 0
        self.errors = 0
        self.recreated = 0  # producers re-created
        self.last_error: str | None = None

    def pump(self) -> int:
        """Hand spooled frames to the producer, oldest first, up to max_in_flight. Returns how many."""
        if self._failed is not None:
            if self._clock() < self._rebuild_at or not self._rebuild():
                self._serve_quietly()
                return 0  # the broken producer takes nothing; the spool keeps everything
        produced, limit = 0, self._in_flight_limit()
        if len(self._in_flight) < limit:  # else librdkafka holds enough: the rest waits in the spool
            produced = self._produce_pending(limit)
        self._serve(0)  # always: while stalled, the run loop serves the client only here
        return produced

    def _produce_pending(self, limit: int) -> int:
        """Spooled frames not yet handed over, oldest first, until `limit` are in flight."""
        produced = 0
        for frame in self.spool.pending_from(self._next):
            if len(self._in_flight) >= limit:
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
                if is_fatal(exc):
                    self._fail("fatal", f"the producer refuses every batch: {exc}")
                else:
                    self._refused(frame, exc)
                break
            if not self._in_flight:
                self._waiting_since = self._clock()
            frame.handed = True
            self._in_flight[frame.position] = frame
            self._next = (frame.segment, frame.offset + 1)
            produced += 1
        return produced

    def _in_flight_limit(self) -> int:
        """max_in_flight while the broker delivers; PROBE_IN_FLIGHT while it has delivered nothing
        for STALLED_AFTER_S (or nothing yet), so an outage of hours holds a few batches in memory,
        not one copy of each."""
        at = self._delivered_at
        if at is not None and self._clock() - at < STALLED_AFTER_S:
            return self.max_in_flight
        return min(self.max_in_flight, PROBE_IN_FLIGHT)

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
        frame.handed = False
        self.spool.settle(frame, delivered=err is None)  # a batch the bound dropped meanwhile: lost or not
        if err is None:
            self.delivered += 1
            self._delivered_at = self._clock()
            self._waiting_since = self._delivered_at if self._in_flight else None
            self._delivered_since_stats = True
            self._rebuild_wait = REBUILD_BACKOFF_S[0]
            self.spool.ack(frame)
            if self.metrics is not None:
                self.metrics.published.inc()
            return
        self.errors += 1
        self.last_error = str(err)
        if self.metrics is not None:
            self.metrics.publish_errors.inc()
        if is_fatal(err):
            self._fail("fatal", f"delivery of stream {frame.stream_id} seq {frame.seq} failed: {err}")
        elif error_code(err) == MSG_SIZE_TOO_LARGE:
            self._fail(
                "delivery failed",
                f"the broker refused stream {frame.stream_id} seq {frame.seq} ({frame.size} bytes) as too "
                "large: set kafka.max_batch_bytes (or message.max.bytes in [kafka.properties]) below the "
                "broker's message.max.bytes and the topic's max.message.bytes; the batch stays in the spool",
            )
        else:
            what = f"delivery of stream {frame.stream_id} seq {frame.seq} failed: {err}"
            self._fail("delivery failed", what)

    def _on_client_error(self, err: Any) -> None:
        self.errors += 1
        self.last_error = str(err)
        if self.metrics is not None:
            self.metrics.publish_errors.inc()
        if is_fatal(err):
            self._fail("fatal", f"fatal producer error: {err}")
            return
        KAFKA_LOG.warning("kafka: %s (batches stay in the spool until the broker takes them)", err)

    def _on_stats(self, report: str) -> None:
        """librdkafka's statistics: an epoch that keeps climbing with nothing delivered is a
        broker that answers UNKNOWN_PRODUCER_ID to every retry (it lost the producer's state)."""
        eos = producer_identity(report)
        if eos is None or self._failed is not None:
            return
        mark = self._epoch_mark
        if self._delivered_since_stats or not self._in_flight or mark is None or mark[0] != eos[0]:
            self._epoch_mark = eos
            self._delivered_since_stats = False
            return
        bumps = eos[1] - mark[1]
        if bumps >= STUCK_EPOCH_BUMPS:
            self.errors += 1
            self.last_error = f"UNKNOWN_PRODUCER_ID: epoch bumped {bumps} times without a delivery"
            if self.metrics is not None:
                self.metrics.publish_errors.inc()
            self._fail(
                "unknown producer",
                f"the broker does not know producer id {eos[0]} any more (lost its state?): "
                f"librdkafka bumped the epoch {bumps} times with nothing delivered",
            )

    def _fail(self, reason: str, why: str) -> None:
        """The producer must be re-created (at the next pump, after the back-off)."""
        if self._failed is None:
            RECOVERY_LOG.warning(
                "kafka producer unusable (%s): re-creating it and re-sending the %d unacknowledged "
                "batches from the spool under their own stream and sequence numbers (the collector "
                "drops any it already has)",
                why,
                self.spool.pending_count(),
            )
        self._failed = reason

    def _serve(self, timeout: float) -> None:
        """librdkafka's callbacks. A fatal error can also come out of poll() itself (the
        confluent-kafka client raises it there): the producer is re-created then."""
        try:
            self._producer.poll(timeout)
        except Exception as exc:
            if not is_fatal(exc):
                raise
            self.errors += 1
            self.last_error = str(exc)
            if self.metrics is not None:
                self.metrics.publish_errors.inc()
            self._fail("fatal", f"fatal producer error: {exc}")

    def _serve_quietly(self) -> None:
        try:
            self._producer.poll(0)
        except Exception as exc:  # a fatal producer may refuse even this
            log.debug("serving the failed producer: %s", exc)

    def _rebuild(self) -> bool:
        """Replace the producer and drop its queue; everything not acknowledged is produced again."""
        reason = self._failed or "delivery failed"
        try:
            new = self._factory(self._config)
        except Exception as exc:
            RECOVERY_LOG.error("re-creating the kafka producer failed: %s; trying again later", exc)
            self._back_off()
            return False
        self._generation += 1  # deliveries of the old producer (its purged messages) are ignored
        old, self._producer = self._producer, new
        try:
            old.purge()
            old.poll(0)
        except Exception as exc:  # a fatal producer may refuse even this
            log.debug("purging the old producer: %s", exc)
        del old  # librdkafka's handle goes with the last reference: its threads and sockets end
        self.recreated += 1
        if self.metrics is not None:
            self.metrics.producer_recreations.labels(reason).inc()
        self._forget_in_flight()
        self._waiting_since = None
        self._next = (0, 0)
        self._failed = None
        self._epoch_mark = None
        self._back_off()
        return True

    def _forget_in_flight(self) -> None:
        """The producer's copies are purged: none of them will be delivered by it."""
        for frame in self._in_flight.values():
            frame.handed = False
            self.spool.settle(frame, delivered=False)
        self._in_flight.clear()

    def _back_off(self) -> None:
        """The next rebuild waits, longer each time while nothing gets delivered."""
        self._rebuild_at = self._clock() + self._rebuild_wait
        self._rebuild_wait = min(self._rebuild_wait * 2, REBUILD_BACKOFF_S[1])

    def service(self, timeout: float) -> None:
        """Serve delivery callbacks for up to `timeout` seconds, then top the producer up."""
        if self._failed is None:
            self._serve(timeout)
        else:  # a failed producer may answer at once: wait here, not in a busy loop
            time.sleep(max(0.0, min(timeout, self._rebuild_at - self._clock())))
        self.pump()

    def in_flight(self) -> int:
        return len(self._in_flight)

    def stalled(self) -> bool:
        """Batches in flight and nothing delivered for STALLED_AFTER_S: the broker is away. The
        run loop then stops waiting inside the client between polls (confluent-kafka's poll()
        wakes every 200 ms to look for signals: about half a millisecond of CPU per poll
        interval, the whole outage long); each poll's pump still serves it, and the first
        delivery there ends the stall."""
        since = self._waiting_since
        return bool(self._in_flight) and since is not None and self._clock() - since >= STALLED_AFTER_S

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
            if self._failed is None:
                self._serve(min(left, 0.1))
            else:
                time.sleep(max(0.0, min(left, 0.1, self._rebuild_at - self._clock())))

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
            self._forget_in_flight()
            log.warning(
                "%d batches not delivered at exit; they stay in the spool and are re-sent at the next start",
                len(self.spool.pending()),
            )
        return done
