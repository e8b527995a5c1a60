"""Reconciliation passes as one of the collector's inputs (inputs.Input): CloudStack's API is
read on a thread; the feed loop, which alone touches the collector, computes the corrections
and applies them as lifecycle records like any other source's.

    Reconciler(collector, source, period_s, metrics=None)
    .plan(snapshot) -> Findings     # what a pass would change (kvmeter reconcile --dry-run)
    .apply(snapshot) -> Outcome     # one pass outside the loop (kvmeter reconcile)
    .start() / .poll() / .caught_up() / .status() / .close()   # the Input

A pass that cannot read the whole API (unreachable, an error, garbage) changes nothing: it
counts kvmeter_reconcile_errors and billing goes on from events. Run the [cloudstack] section on
one replica or on several: a replica leaves its pass out when another kept one less than half a
period ago (the same inputs give the same corrections either way).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from kvmeter.collector.config_cloudstack import CloudStackConfig
from kvmeter.collector.cs_snapshot import ApiUnavailable, Snapshot, SnapshotError
from kvmeter.collector.inputs import LIFECYCLE, Delivery
from kvmeter.collector.metrics import Metrics
from kvmeter.collector.model import Outcome, Record
from kvmeter.collector.public_vlans import Key, mistyped, public_vlan_zones
from kvmeter.collector.reconcile import Findings, reconcile, view_of
from kvmeter.collector.service import Collector
from kvmeter.collector.store import reconciliation

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
        self._fresh = threading.Event()
        self.passes = 0
        self._kept_ms = -1  # when this reconciler last kept a pass (its own are no reason to wait)
        self.last_error = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mistyped: dict[Key, int] = {}  # what the last pass found (logged once while it lasts)

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
            previous = reconciliation.load_snapshot(conn)
            witness = reconciliation.load_witness(conn)
        witness.update(self.collector.witness)
        # Resources CloudStack lists are read whole, also those that left memory.
        self.collector.restore({*snapshot.vms, *snapshot.ips, *snapshot.routers})
        events = {resource: list(evs.values()) for resource, evs in self.collector.events.items()}
        view = view_of(events, self.collector.histories, witness)
        return reconcile(view, snapshot, previous, self.collector.settings.policy)

    def apply(self, snapshot: Snapshot) -> Outcome:
        """One whole pass outside the feed loop: plan, apply the events, keep the rest."""
        delivery = self._deliver(snapshot)
        if delivery is None:
            return Outcome()
        out = self.collector.apply_events(delivery.records, within=delivery.within)
        delivery.ack()
        return out

    def _deliver(self, snapshot: Snapshot) -> Delivery | None:
        """The pass's corrections as a lifecycle delivery; their reasons, the names and the
        snapshot (the next pass's previous) are stored in the same transaction as the correcting
        events (`within`: a crash or a failing store between two transactions would leave a
        correction applied and never listed). None when the snapshot is refused."""
        try:
            found = self.plan(snapshot)
        except SnapshotError as exc:
            self._error("implausible", exc)
            return None
        records = [
            Record(c.event_value(), c.resource_uuid.encode(), f"{RECONCILE}:{c.event_type}:{c.resource_uuid}")
            for c in found.corrections
        ]
        return Delivery(
            LIFECYCLE,
            records,
            ack=lambda: self._kept(found, snapshot),
            within=lambda conn: self._store(conn, snapshot, found),
        )

    def _store(self, conn: Connection, snapshot: Snapshot, found: Findings) -> None:
        now = self._kept_ms = self.collector.clock()
        reconciliation.save_corrections(conn, found.corrections, now)
        reconciliation.save_names(conn, snapshot, now)
        reconciliation.save_snapshot(conn, snapshot, now)

    def _kept(self, found: Findings, snapshot: Snapshot) -> None:
        for c in found.corrections:
            log.info("correction %s %s at %d: %s", c.event_type, c.resource_uuid, c.time_ms, c.reason)
            if self.metrics is not None:
                self.metrics.corrections.labels(c.event_type).inc()
        for note in found.notes:
            log.info("reconcile: %s", note)
        self._check_public_vlans(snapshot)
        self.passes += 1
        if self.metrics is not None:
            self.metrics.reconcile_passes.inc()

    def _check_public_vlans(self, snapshot: Snapshot) -> None:
        """Reported, never re-typed (public_vlans.py): NICs the agents place on one of the zone's
        public VLANs but type otherwise, whose bytes are then never billed as public."""
        placed = self.collector.placements.current(self.collector.clock())
        public = public_vlan_zones(snapshot.vlans.values())
        found = mistyped(placed, public)
        for (host, vlan, kind), nics in sorted(found.items()):
            if (host, vlan, kind) not in self._mistyped:
                log.warning(
                    "host %s: %d NIC(s) on VLAN %d, a public VLAN of CloudStack's zone(s) %s "
                    "(listVlanIpRanges), are typed %r by the agent: if the host is in one of those "
                    "zones their bytes are not billed as public, and its agent's config needs "
                    '[[traffic.rules]] vlan = "%d" type = "public" (in another zone VLAN %d is '
                    "that zone's own: leave it)",
                    host, nics, vlan, ", ".join(public[vlan]) or "?", kind or "unknown", vlan, vlan,
                )  # fmt: skip
        self._mistyped = found
        if self.metrics is not None:
            gauge = self.metrics.public_vlan_mistyped
            gauge.clear()  # a placement fixed or gone leaves no stale series
            for (host, vlan, kind), nics in found.items():
                gauge.labels(host, str(vlan), kind or "unknown").set(nics)

    # -- inputs.Input ------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="reconcile", daemon=True)
            self._thread.start()

    def poll(self, timeout: float, *, measures: bool = True) -> list[Delivery]:
        """The latest fetched pass, once; none while the loop catches up with the lifecycle."""
        if not measures:
            return []
        if self._fresh.wait(timeout):
            with self._lock:
                snapshot, self._ready = self._ready, None
                self._fresh.clear()
            if snapshot is None:
                return []
            try:  # both read the store: a failing one must not end the loop
                if self._passed_elsewhere():
                    # Each replica knows the inventories of the partitions it reads.
                    self._check_public_vlans(snapshot)
                    return []
                delivery = self._deliver(snapshot)
            except SQLAlchemyError as exc:
                log.warning("reconcile: store unavailable (%s); the pass is tried again", exc)
                with self._lock:
                    if self._ready is None:  # none newer fetched meanwhile
                        self._ready = snapshot
                        self._fresh.set()
                return []
            return [] if delivery is None else [delivery]
        return []

    def _passed_elsewhere(self) -> bool:
        """Another replica kept a pass less than half a period ago: leave this one out (the
        same inputs would give the same corrections; this saves the work and the noise)."""
        with self.collector.store.read() as conn:
            last = reconciliation.last_pass_ms(conn)
        if last is None or last <= self._kept_ms:
            return False
        ago = self.collector.clock() - last
        if ago >= self.period_s * 500:
            return False
        log.info("reconcile: another replica passed %d ms ago; this pass is left out", ago)
        return True

    def caught_up(self) -> bool:
        return True  # nothing to catch up with: every pass reads the whole API

    def status(self) -> dict[str, Any]:
        # Reported, never "degraded": without the API billing goes on from events.
        return {"cloudstack_api": {"passes": self.passes, "last_error": self.last_error}}

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            snapshot = self.fetch()
            if snapshot is not None:
                with self._lock:
                    self._ready = snapshot
                    self._fresh.set()
            self._stop.wait(self.period_s)

    def _error(self, reason: str, exc: Exception) -> None:
        self.last_error = f"{reason}: {exc}"
        log.warning("reconciliation pass given up (%s): %s; billing goes on from events", reason, exc)
        if self.metrics is not None:
            self.metrics.reconcile_errors.labels(reason).inc()


def for_config(collector: Collector, cfg: CloudStackConfig, metrics: Metrics | None = None) -> Reconciler:
    """A Reconciler reading the API of a [cloudstack] section."""
    try:
        from kvmeter.collector.cs_client import CloudStackApi  # the `cs` library: only when configured
    except ImportError as exc:
        raise RuntimeError(f"[cloudstack] needs the `cs` package (pip install cs): {exc}") from None

    api = CloudStackApi(cfg.endpoint, cfg.api_key, cfg.secret_key, cfg.timeout_s)
    return Reconciler(collector, api.snapshot, cfg.period_s, metrics)
