"""The hand-off's relay: billable items from the outbox to the configured sinks, at least once.

    Relay(store, cfg, metrics).run(stop)     # a thread of the collector (and the all-in-one)

A round claims a batch of pending items (a lease: another replica skips them), gives each
sink the items the claim offers it (of a record, the first version it lacks; an item the
webhook refused after the others, once its pause is over: store/outbox.py), marks what each
confirmed, and frees the rest for the next round. Nothing is marked before its sink confirmed
it, so a crash anywhere (kill -9 in the middle of a delivery) loses nothing: the items are sent
again once the lease lapses, and the receiver, deduplicating by transaction id, counts each
once (at least once + stable ids = exactly-once effect). While a round delivers, a thread of its
own renews the lease every third of it, so a long round (a webhook's backoff) keeps its items,
and the lease can be short: a killed relay's items wait at most one lease.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector as PromCollector

from kvmeter.collector.config_handoff import HandoffConfig
from kvmeter.collector.outbox_sinks import KafkaSink, Sink, WebhookSink
from kvmeter.collector.store import Store
from kvmeter.collector.store.outbox import TOPIC, OutboxRow

log = logging.getLogger(__name__)

# Crash tests kill the process at the delicate instant: a sink confirmed items, the outbox does
# not know yet. "handoff-after-delivery:N" fires after the Nth confirmed delivery.
FAILPOINT = "KVMETER_FAILPOINT"
_FAILPOINT_PREFIX = "handoff-after-delivery:"


def _wall_ms() -> int:
    return int(time.time() * 1000)


class HandoffMetrics(PromCollector):
    """Counters the relay feeds, and the outbox's depth, oldest pending age and refused items
    read at scrape time (every replica reports the shared store's truth)."""

    def __init__(self, registry: CollectorRegistry, store: Store, clock: Callable[[], int] = _wall_ms):
        self.store = store
        self.clock = clock
        self.registry = registry
        self.errors = Counter(
            "kvmeter_handoff_delivery_errors",
            "Failed delivery attempts of billable items (not an item refused: kvmeter_handoff_refused_items)",
            ["sink"],
            registry=registry,
        )
        self.delivered = Counter(
            "kvmeter_handoff_delivered", "Billable items a sink confirmed", ["sink"], registry=registry
        )
        registry.register(self)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            depth, oldest = self.store.outbox_stats()
            refused = self.store.outbox_refused()
        except Exception as exc:  # a scrape must not fail because the database is down
            log.warning("outbox gauges unavailable: %s", exc)
            return
        yield GaugeMetricFamily(
            "kvmeter_handoff_outbox_depth", "Billable items not yet handed off", value=depth
        )
        age = 0.0 if oldest is None else max(0, self.clock() - oldest) / 1000
        yield GaugeMetricFamily(
            "kvmeter_handoff_oldest_pending_seconds", "Age of the oldest item not yet handed off", value=age
        )
        yield GaugeMetricFamily(
            "kvmeter_handoff_refused_items",
            "Items not yet handed off that the webhook refused (a 4xx about the item) when last offered",
            value=refused,
        )


class Relay:
    def __init__(
        self,
        store: Store,
        cfg: HandoffConfig,
        metrics: HandoffMetrics,
        *,
        clock: Callable[[], int] = _wall_ms,
        stop: threading.Event | None = None,
    ):
        self.store = store
        self.cfg = cfg
        self.metrics = metrics
        self.clock = clock
        self.stop_event = stop or threading.Event()
        self.sinks: list[Sink] = []
        if cfg.topic:
            self.sinks.append(KafkaSink(cfg, self._error_of("topic")))
        if cfg.webhook_url:
            self.sinks.append(WebhookSink(cfg, self._error_of("webhook"), self.stop_event, self._refused_by))
        self.sink_names = [s.name for s in self.sinks]
        self._thread: threading.Thread | None = None
        point = os.environ.get(FAILPOINT, "")
        self._kill_after = int(point.split(":", 1)[1]) if point.startswith(_FAILPOINT_PREFIX) else 0
        self._deliveries = 0
        self._lease_lock = threading.Lock()  # a renewal and the release, one at a time
        self._held_until = 0
        self._settled = False  # rows a sink no longer configured lacked: settled at the first round
        self._refused: dict[int, str] = {}  # the current sink's refusals in this round (row id: answer)

    def _error_of(self, sink: str) -> Callable[[str], None]:
        def count(message: str) -> None:
            self.metrics.errors.labels(sink).inc()
            log.warning("hand-off to %s: %s", sink, message)

        return count

    def _refused_by(self, row_id: int, answer: str) -> None:
        self._refused[row_id] = answer

    def round(self) -> tuple[int, bool]:
        """One round; returns (items claimed, whether every one was confirmed by every sink)."""
        now = self.clock()
        if not self._settled:
            settled = self.store.settle_outbox(self.sink_names, now)
            if settled:
                log.info("hand-off: %d items every configured sink has are sent", settled)
            self._settled = True
        rows = self.store.claim_outbox(self.cfg.batch_size, now, self.cfg.lease_ms, self.sink_names)
        if not rows:
            return 0, True
        # The lease this round set last: its token. A relay claims rows only once their lease
        # lapsed, so its lease ends after ours; renewals and the release touch ours alone.
        self._held_until = now + self.cfg.lease_ms
        finished = threading.Event()
        keeper = threading.Thread(
            target=self._keep_lease, args=([r.id for r in rows], finished), name="handoff-lease", daemon=True
        )
        keeper.start()
        try:
            return self._deliver(rows)
        finally:
            finished.set()
            keeper.join()

    def _keep_lease(self, ids: list[int], finished: threading.Event) -> None:
        """Renew the round's lease every third of it until the round is over."""
        while not finished.wait(self.cfg.lease_s / 3):
            now = self.clock()
            try:
                with self._lease_lock:
                    until = now + self.cfg.lease_ms
                    if self.store.renew_outbox(ids, until, now, self._held_until):
                        self._held_until = until
            except Exception as exc:  # the next renewal tries again; a lapse only risks a duplicate
                log.warning("hand-off: lease not renewed: %s", exc)

    def _deliver(self, rows: list[OutboxRow]) -> tuple[int, bool]:
        unsent = {r.id for r in rows}
        done: dict[str, set[int]] = {name: set() for name in self.sink_names}
        refusals: dict[str, dict[int, str]] = {}
        error = ""
        for sink in self.sinks:
            had = {r.id for r in rows if (r.topic_sent if sink.name == TOPIC else r.webhook_sent)}
            todo = [r for r in rows if r.id not in had and sink.name in r.offered]
            self._refused = {}
            try:
                confirmed, problem = sink.deliver(todo) if todo else ([], "")
            except Exception as exc:  # one sink's failure must not keep the others from their turn
                log.warning("hand-off to %s failed: %s", sink.name, exc)
                self.metrics.errors.labels(sink.name).inc()
                confirmed, problem = [], f"{type(exc).__name__}: {exc}"
            if self._kill_after and confirmed:
                self._deliveries += 1
                if self._deliveries >= self._kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
            self.store.confirm_outbox(confirmed, sink.name, self.clock(), self.sink_names)
            self.metrics.delivered.labels(sink.name).inc(len(confirmed))
            refusals[sink.name], self._refused = self._refused, {}
            done[sink.name] = had | set(confirmed)
            error = error or problem
        unsent = {i for i in unsent if not all(i in done[name] for name in self.sink_names)}
        with self._lease_lock:
            self.store.release_outbox(sorted(unsent), error or "not confirmed", self._held_until)
        for name, refused in refusals.items():
            if refused:  # still pending; offered again after a growing pause, behind the others
                self.store.refuse_outbox(refused, name, self.clock(), self.cfg.refused_pause_ms)
                log.warning(
                    "hand-off: the %s refused %d item(s), offered again after the others: %s",
                    name, len(refused), "; ".join(sorted(refused.values())[:5]),
                )  # fmt: skip
        return len(rows), not unsent

    def run(self) -> None:
        """Rounds until stop(): straight on while there is work, a pause when idle or failing."""
        while not self.stop_event.is_set():
            try:
                claimed, ok = self.round()
            except Exception:
                log.exception("hand-off round failed; retrying")
                claimed, ok = 0, False
            if not claimed or not ok:
                self.stop_event.wait(
                    self.cfg.poll_s if ok else max(self.cfg.poll_s, self.cfg.retry_initial_s)
                )

    def stop(self) -> None:
        self.stop_event.set()

    def start(self) -> Relay:
        """Rounds on a thread of their own."""
        self._thread = threading.Thread(target=self.run, name="handoff", daemon=True)
        self._thread.start()
        targets = [self.cfg.topic and f"topic {self.cfg.topic} on {self.cfg.bootstrap}", self.cfg.webhook_url]
        log.info("hand-off: %s", ", ".join(t for t in targets if t))
        return self

    def close(self) -> None:
        """Stop, let the current round end (a killed round is sent again anyway), close sinks."""
        self.stop()
        if self._thread is not None:
            self._thread.join(self.cfg.timeout_s + 5)
        for sink in self.sinks:
            sink.close()


def start(store: Store, cfg: HandoffConfig, registry: CollectorRegistry) -> Relay:
    """A relay with its metrics in `registry`, running on its own thread."""
    return Relay(store, cfg, HandoffMetrics(registry, store)).start()
