"""Reconciliation passes: CloudStack's API read on a thread, corrections applied on the
collector's tick (its state is single-threaded), as lifecycle events through apply_events.

    Reconciler(collector, source, period_s, metrics=None)
    .plan(snapshot) -> Findings     # what a pass would change (kvmeter reconcile --dry-run)
    .apply(snapshot) -> Outcome     # store the corrections (reasons) and apply their events
    .start() / .stop()              # the fetching thread; the collector's tick applies

A pass that cannot read the whole API (unreachable, an error, garbage) changes nothing: it
counts kvmeter_reconcile_errors and billing goes on from events. Run the [cloudstack] section on
one replica: passes of two replicas would add the same corrections at different times.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from kvmeter.collector import reconcile_store
from kvmeter.collector.config_cloudstack import CloudStackConfig
from kvmeter.collector.cs_snapshot import ApiUnavailable, Snapshot, SnapshotError
from kvmeter.collector.metrics import Metrics
from kvmeter.collector.reconcile import Findings, reconcile, view_of
from kvmeter.collector.service import Collector, Outcome, Record

log = logging.getLogger(__name__)

RECONCILE = "reconcile"  # origin prefix of the correcting events


class Reconciler:
    def __init__(
        self,
        collector: Collector,
        source: Callable[[int], Snapshot],
        period_s: float = 300.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.collector = collector
        self.source = source
        self.period_s = period_s
        self.metrics = metrics
        self._ready: Snapshot | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def fetch(self) -> Snapshot | None:
        """One read of the API; None (and an error counted) when it is not usable."""
        try:
            return self.source(self.collector.clock())
        except ApiUnavailable as exc:
            self._error("unavailable", exc)
            return None

    def plan(self, snapshot: Snapshot) -> Findings:
        self.collector.sync()
        with self.collector.store.read() as conn:
            previous = reconcile_store.load_snapshot(conn)
            witness = reconcile_store.load_witness(conn)
        witness.update(self.collector.witness)
        events = {resource: list(evs.values()) for resource, evs in self.collector.events.items()}
        view = view_of(events, self.collector.histories, witness)
        return reconcile(view, snapshot, previous)

    def apply(self, snapshot: Snapshot) -> Outcome:
        try:
            found = self.plan(snapshot)
        except SnapshotError as exc:
            self._error("implausible", exc)
            return Outcome()
        now = self.collector.clock()
        with self.collector.store.write() as conn:
            reconcile_store.save_corrections(conn, found.corrections, now)
            reconcile_store.save_names(conn, snapshot, now)
            reconcile_store.save_snapshot(conn, snapshot, now)
        records = [
            Record(c.event_value(), c.resource_uuid.encode(), f"{RECONCILE}:{c.event_type}:{c.resource_uuid}")
            for c in found.corrections
        ]
        out = self.collector.apply_events(records) if records else Outcome()
        for c in found.corrections:
            log.info("correction %s %s at %d: %s", c.event_type, c.resource_uuid, c.time_ms, c.reason)
            if self.metrics is not None:
                self.metrics.corrections.labels(c.event_type).inc()
        for note in found.notes:
            log.info("reconcile: %s", note)
        if self.metrics is not None:
            self.metrics.reconcile_passes.inc()
        return out

    def on_tick(self) -> Outcome:
        """Apply the latest snapshot the thread fetched, if any (the collector's tick calls it)."""
        with self._lock:
            snapshot, self._ready = self._ready, None
        return self.apply(snapshot) if snapshot is not None else Outcome()

    def start(self) -> None:
        self.collector.tick_hooks.append(self.on_tick)
        self._thread = threading.Thread(target=self._run, name="reconcile", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            snapshot = self.fetch()
            if snapshot is not None:
                with self._lock:
                    self._ready = snapshot
            self._stop.wait(self.period_s)

    def _error(self, reason: str, exc: Exception) -> None:
        log.warning("reconciliation pass given up (%s): %s; billing goes on from events", reason, exc)
        if self.metrics is not None:
            self.metrics.reconcile_errors.labels(reason).inc()


def for_config(collector: Collector, cfg: CloudStackConfig, metrics: Metrics | None = None) -> Reconciler:
    """A Reconciler reading the API of a [cloudstack] section."""
    from kvmeter.collector.cs_client import CloudStackApi  # the `cs` library: only when configured

    api = CloudStackApi(cfg.endpoint, cfg.api_key, cfg.secret_key, cfg.timeout_s)
    return Reconciler(collector, api.snapshot, cfg.period_s, metrics)
