"""The agent's own Prometheus metrics, served on a loopback port.

With metrics disabled nothing of prometheus_client is imported (about 10 MB of the agent's
resident memory): every metric is then a no-op stand-in with the same methods.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

PREFIX = "kvmeter_agent"


class _Unserved:
    """A metric nobody will read: inc, set, observe and labels do nothing."""

    def inc(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, value: float) -> None:
        pass

    def labels(self, *values: str) -> _Unserved:
        return self


class AgentMetrics:
    """One registry per agent (tests build several in one process); `enabled=False`: no-ops."""

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.registry: Any = None
        if not enabled:
            unserved = _Unserved()
            for name in METRIC_NAMES:
                setattr(self, name, unserved)
            return
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        from prometheus_client.process_collector import ProcessCollector

        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # the agent's own CPU, memory and open files
        self.poll_seconds = Histogram(
            f"{PREFIX}_poll_duration_seconds",
            "Time of one poll: counter read, deltas, batch, spool write.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.polls = Counter(f"{PREFIX}_polls_total", "Polls done.", registry=r)
        self.poll_errors = Counter(f"{PREFIX}_poll_errors_total", "Polls that failed.", registry=r)
        self.interfaces = Gauge(f"{PREFIX}_interfaces", "Metered VM interfaces in the last poll.", registry=r)
        self.bytes = Counter(
            f"{PREFIX}_bytes_total",
            "Bytes measured, by traffic type and VM direction (quarantined included).",
            ["traffic_type", "direction"],
            registry=r,
        )
        self.quarantines = Counter(
            f"{PREFIX}_quarantined_deltas_total",
            "Counter jumps quarantined (sent, never billed).",
            registry=r,
        )
        self.final_deltas = Counter(
            f"{PREFIX}_final_deltas_total", "Tails counted from RTM_DELLINK final counters.", registry=r
        )
        self.spool_frames = Gauge(
            f"{PREFIX}_spool_pending_batches", "Batches spooled, not delivered.", registry=r
        )
        self.spool_bytes = Gauge(f"{PREFIX}_spool_pending_bytes", "Bytes of undelivered batches.", registry=r)
        self.spool_age = Gauge(
            f"{PREFIX}_spool_oldest_age_seconds", "Age of the oldest undelivered batch (0: none).", registry=r
        )
        self.spool_dropped_bytes = Counter(
            f"{PREFIX}_spool_dropped_bytes_total", "Spool bytes dropped at the size or age bound.", registry=r
        )
        self.dropped_measure_bytes = Counter(
            f"{PREFIX}_dropped_measured_bytes_total",
            "Metered bytes inside batches dropped at the spool bound (lost to billing).",
            registry=r,
        )
        self.published = Counter(
            f"{PREFIX}_published_batches_total", "Batches the broker acknowledged.", registry=r
        )
        self.publish_errors = Counter(f"{PREFIX}_publish_errors_total", "Failed deliveries.", registry=r)
        self.producer_recreations = Counter(
            f"{PREFIX}_producer_recreations_total",
            "Kafka producers re-created (fatal error, producer id lost by the broker, failed "
            "delivery); every unacknowledged batch is then re-sent from the spool.",
            ["reason"],
            registry=r,
        )
        self.unmetered_nics = Gauge(
            f"{PREFIX}_unmetered_nics",
            "NICs of running domains the agent cannot meter (no host link, no counter source: an "
            "SR-IOV VF passed through, user-mode networking, ...); each is logged once.",
            registry=r,
        )
        self.libvirt_reconnects = Gauge(
            f"{PREFIX}_libvirt_reconnects", "libvirt reconnects since the agent started.", registry=r
        )
        self.link_events = Counter(
            f"{PREFIX}_link_events_total", "Netlink link events.", ["kind"], registry=r
        )
        self.reload_failures = Counter(
            f"{PREFIX}_reload_failures_total",
            "Reloads (SIGHUP) refused because the config was bad; the rules in force stay.",
            ["what"],
            registry=r,
        )

    def spool_dropped(self, frame: Any, batch: bytes) -> None:
        """Spool on_drop callback: count the frame's bytes and the metered bytes it carried."""
        if not self.enabled:
            return
        from kvmeter.proto import pb

        self.spool_dropped_bytes.inc(frame.size)
        try:
            lost = sum(m.bytes for m in pb.MeasureBatch.FromString(batch).measures)
        except Exception:  # a batch that does not decode still counts by its spool bytes
            lost = 0
        self.dropped_measure_bytes.inc(lost)

    def serve(self, address: str, port: int) -> Any:
        """Start the HTTP endpoint; returns the server (prometheus-client >= 0.17) or None."""
        if not self.enabled:
            raise RuntimeError("metrics are disabled: nothing to serve")
        from prometheus_client import start_http_server

        server = start_http_server(port, addr=address, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", address, port)
        return server


# Every metric attribute of AgentMetrics (the no-op stand-ins get the same names).
METRIC_NAMES = (
    "poll_seconds",
    "polls",
    "poll_errors",
    "interfaces",
    "bytes",
    "quarantines",
    "final_deltas",
    "spool_frames",
    "spool_bytes",
    "spool_age",
    "spool_dropped_bytes",
    "dropped_measure_bytes",
    "published",
    "publish_errors",
    "producer_recreations",
    "unmetered_nics",
    "libvirt_reconnects",
    "link_events",
    "reload_failures",
)
