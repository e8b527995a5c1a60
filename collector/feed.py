"""The collector's loop over its inputs: poll, apply in one transaction, acknowledge, tick.

- Lifecycle first: until every input has read its lifecycle backlog (or CATCH_UP_S passed), only
  lifecycle records are asked for, so measures find their owners instead of being parked.
- A delivery is acknowledged only after the service's transaction committed; a failing database
  is retried in place with backoff (the input's records wait, nothing is acknowledged).
- A poison record is dead-lettered by the service (inside the same transaction as its chunk) and
  the loop moves on.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from kvmeter.collector.inputs import LIFECYCLE, MEASURES, Delivery, Input
from kvmeter.collector.metrics import Metrics
from kvmeter.collector.model import Outcome
from kvmeter.collector.service import Collector
from kvmeter.collector.store import StoreTooNew
from kvmeter.reload import Reloads

log = logging.getLogger(__name__)

CATCH_UP_S = 60.0
# Crash tests kill the process at the most delicate instant: after a measures transaction
# committed, before it is acknowledged. "after-db-commit:N" fires on the Nth commit.
FAILPOINT = "KVMETER_FAILPOINT"


def drain(collector: Collector, source: Input) -> Outcome:
    """Apply everything an input has now, without retrying (batch ingest: a failure is the
    caller's to report)."""
    out = Outcome()
    source.start()
    try:
        while True:
            deliveries = source.poll(0)
            for delivery in deliveries:
                out.add(_applier(collector, delivery)())
                delivery.ack()
            if not deliveries and source.caught_up():
                return out
    finally:
        source.close()


def _applier(collector: Collector, delivery: Delivery) -> Callable[[], Outcome]:
    """The service's path for a delivery's kind, bound to its records."""
    records = delivery.records
    if delivery.kind == MEASURES:
        return lambda: collector.apply_batches(records)
    if delivery.kind == LIFECYCLE:
        return lambda: collector.apply_events(records, within=delivery.within)
    raise ValueError(f"unknown delivery kind {delivery.kind!r}")


class Feeder:
    def __init__(
        self,
        collector: Collector,
        inputs: Sequence[Input],
        metrics: Metrics,
        *,
        tick_seconds: float = 30.0,
        poll_timeout: float = 0.5,
        monotonic: Callable[[], float] = time.monotonic,
        reloads: Reloads | None = None,
    ):
        self.collector = collector
        self.reloads = reloads or Reloads()  # asked for by SIGHUP, run here between two rounds
        self.inputs = list(inputs)
        self.metrics = metrics
        self.tick_seconds = tick_seconds
        self.poll_timeout = poll_timeout
        self.monotonic = monotonic
        self.stop_event = threading.Event()
        self.failing = ""  # the stage being retried and why, "" when all is well
        self.last_success = self.monotonic()
        self._last_tick = float("-inf")
        self.totals = Outcome()
        self._commits = 0
        point = os.environ.get(FAILPOINT, "")
        self._kill_after = int(point.split(":", 1)[1]) if point.startswith("after-db-commit:") else 0

    def start(self) -> None:
        for source in self.inputs:
            source.start()

    def catch_up(self, timeout_s: float = CATCH_UP_S) -> None:
        """Apply lifecycle records until every input has read its backlog (or the time is up)."""
        deadline = self.monotonic() + timeout_s
        while not self.stop_event.is_set() and self.monotonic() < deadline:
            self.step(measures=False)
            if all(source.caught_up() for source in self.inputs):
                break
        # What is known now (histories, owner index) lives as long as the loop: set it apart, or
        # every full garbage collection, triggered by the objects each chunk makes, walks it again.
        gc.collect()
        gc.freeze()

    def run(self) -> None:
        self.start()
        self.catch_up()
        try:
            while not self.stop_event.is_set():
                self.step()
        finally:
            self.close()

    def step(self, *, measures: bool = True, timeout: float | None = None) -> None:
        """One round: every input polled (only the last one waits), its deliveries applied and
        acknowledged, then the tick when it is due (not while catching up)."""
        self.reloads.run_pending()
        wait = self.poll_timeout if timeout is None else timeout
        for i, source in enumerate(self.inputs):
            last = i == len(self.inputs) - 1
            for delivery in source.poll(wait if last else 0, measures=measures):
                self.apply(delivery)
        now = self.monotonic()
        if measures and now - self._last_tick >= self.tick_seconds:
            self._last_tick = now
            self._retrying("tick", self.collector.tick)

    def apply(self, delivery: Delivery) -> None:
        self._retrying(delivery.kind, _applier(self.collector, delivery))
        if delivery.kind == MEASURES:
            self._commits += 1
            if self._commits == self._kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
        delivery.ack()  # only now, after the commit

    def _retrying(self, stage: str, work: Callable[[], Outcome]) -> None:
        """Run one transaction-backed step until it succeeds (or we are stopped)."""
        delay = 0.2
        while True:
            try:
                out = work()
            except StoreTooNew as exc:
                # A newer replica migrated the store (a rolling upgrade): never retried, the loop
                # stops; what was not committed is not acknowledged, so the new code gets it again.
                self.failed(stage, exc)
                log.error("%s: %s; stopping this older collector", stage, exc)
                raise
            except Exception as exc:
                if self.stop_event.is_set():
                    raise
                self.failed(stage, exc)
                log.exception("%s: failed, retrying in %.1fs", stage, delay)
                self.stop_event.wait(delay)
                delay = min(delay * 2, 30.0)
                continue
            self.applied(out)
            return

    def failed(self, stage: str, exc: Exception) -> None:
        """A transaction-backed step failed (retried): /health says failing, the error is counted."""
        self.failing = f"{stage}: {type(exc).__name__}"
        self.metrics.errors.labels(stage).inc()

    def applied(self, out: Outcome) -> None:
        """A step committed: its outcome counted and its dead letters logged. Also called by the
        all-in-one's hand-off for the measure batches it applies outside this loop."""
        self.failing = ""
        self.last_success = self.monotonic()
        self.metrics.record(out)
        self.totals.add(out)
        self.totals.dead_letters.clear()  # counted in metrics; kept in the store
        for letter in out.dead_letters:
            log.warning(
                "dead-lettered %s %s: %s: %s", letter.source, letter.origin, letter.reason, letter.message
            )

    def status(self) -> dict[str, Any]:
        """For /health: what the inputs are doing and whether applying fails."""
        out: dict[str, Any] = {}
        degraded: list[str] = []  # why inputs cannot reach their sources ("" when they can)
        for source in self.inputs:
            status = source.status()
            degraded += [status.pop("degraded")] if status.get("degraded") else []
            out.update(status)
        out["degraded"] = "; ".join(degraded)
        out["failing"] = self.failing
        out["seconds_since_success"] = round(self.monotonic() - self.last_success, 1)
        return out

    def stop(self) -> None:
        self.stop_event.set()

    def close(self) -> None:
        gc.unfreeze()
        for source in self.inputs:
            source.close()
