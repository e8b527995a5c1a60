"""Prometheus metrics of the collector: counters the service outcomes feed, consumer lag the
consumer sets, and store gauges (parked, unattributed, dead letters) read at scrape time so
every replica reports the shared store's truth."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector as PromCollector

from kvmeter.collector.model import Outcome
from kvmeter.collector.store import Store

log = logging.getLogger(__name__)


class StoreGauges(PromCollector):
    """Gauges computed from the store on each scrape."""

    def __init__(self, store: Store, horizon_start: Callable[[], int]):
        self.store = store
        self.horizon_start = horizon_start

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            stats = self.store.stats(self.horizon_start())
        except Exception as exc:  # a scrape must not fail because the database is down
            log.warning("store gauges unavailable: %s", exc)
            return
        for name, value in sorted(stats.items()):
            yield GaugeMetricFamily(f"kvmeter_store_{name}", f"Store: {name.replace('_', ' ')}", value=value)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        if registry is None:  # a registry handed in may already have its own
            ProcessCollector(registry=r)  # the replica's own CPU, memory and open files
        self.batches = Counter("kvmeter_batches_applied", "Measure batches applied", registry=r)
        self.duplicates = Counter(
            "kvmeter_batches_duplicate", "Measure batches dropped as already applied", registry=r
        )
        self.measures = Counter("kvmeter_measures", "Measures processed", registry=r)
        self.billed_bytes = Counter("kvmeter_billed_bytes", "Bytes added to usage records", registry=r)
        self.parked = Counter("kvmeter_measures_parked", "Measures parked (owner not yet known)", registry=r)
        self.unparked = Counter("kvmeter_measures_unparked", "Parked measures attributed later", registry=r)
        self.unattributed = Counter(
            "kvmeter_measures_unattributed",
            "Parked measures reported as unattributed past the horizon",
            registry=r,
        )
        self.quarantined = Counter("kvmeter_measures_quarantined", "Measures quarantined", registry=r)
        self.events = Counter("kvmeter_lifecycle_events", "New lifecycle events stored", registry=r)
        self.events_file_lost = Counter(
            "kvmeter_events_file_truncations_unrecovered",
            "Events file truncations in place whose unread end no rotated copy held (lines lost)",
            registry=r,
        )
        self.records = Counter("kvmeter_usage_records_written", "Usage record rows written", registry=r)
        self.adjustments = Counter("kvmeter_usage_adjustments_written", "Adjustment rows written", registry=r)
        self.finalized = Counter("kvmeter_usage_records_finalized", "Usage records made final", registry=r)
        self.dead_letters = Counter(
            "kvmeter_dead_letters", "Inputs dead-lettered", ["source", "reason"], registry=r
        )
        self.pruned_bytes = Counter(
            "kvmeter_pruned_resource_bytes",
            "Bytes of late measures of resources whose lifecycle events were pruned (dead-lettered)",
            registry=r,
        )
        self.lag = Gauge(
            "kvmeter_consumer_lag", "Messages behind the partition end", ["topic", "partition"], registry=r
        )
        self.errors = Counter("kvmeter_errors", "Failed processing rounds (retried)", ["stage"], registry=r)
        self.topic_retention = Gauge(
            "kvmeter_topic_retention_seconds",
            "History the topic keeps (retention.ms; -1: unbounded or unknown)",
            ["topic"],
            registry=r,
        )
        self.history_short = Gauge(
            "kvmeter_rebuild_history_short",
            "1 when the measures topic keeps less history than [kafka] rebuild_horizon_days",
            ["topic"],
            registry=r,
        )
        self.reload_failures = Counter(
            "kvmeter_reload_failures",
            "Reloads (SIGHUP) refused because a file was bad; the one in force stays",
            ["what"],
            registry=r,
        )
        self.reconcile_passes = Counter(
            "kvmeter_reconcile_passes",
            "Reconciliation passes applied (CloudStack's API read whole)",
            registry=r,
        )
        self.reconcile_errors = Counter(
            "kvmeter_reconcile_errors",
            "Reconciliation passes given up: API unreachable or its answer unusable (no correction)",
            ["reason"],
            registry=r,
        )
        self.corrections = Counter(
            "kvmeter_reconcile_corrections",
            "Correcting events added by reconciliation",
            ["event"],
            registry=r,
        )
        self.public_vlan_mistyped = Gauge(
            "kvmeter_public_vlan_mistyped_nics",
            "NICs on a public VLAN (CloudStack's listVlanIpRanges) that an agent types otherwise",
            ["host", "vlan", "traffic_type"],
            registry=r,
        )
        self.balance_alerts = Counter(
            "kvmeter_balance_alerts", "Low-balance alerts raised, one per crossing", ["account"], registry=r
        )
        self.balance_webhook_failures = Counter(
            "kvmeter_balance_webhook_failures", "Balance alert deliveries given up for a round", registry=r
        )
        # route: the URL rule matched ("unmatched" for a 404), a bounded set of label values.
        self.api_responses = Counter(
            "kvmeter_api_responses", "HTTP API responses by route and status", ["route", "code"], registry=r
        )

        self.pruned = Counter(
            "kvmeter_pruned_rows", "Rows deleted by retention, by kind (table)", ["kind"], registry=r
        )

    def watch_store(self, store: Store, horizon_start: Callable[[], int]) -> None:
        self.registry.register(StoreGauges(store, horizon_start))

    def record_pruned(self, counts: dict[str, int]) -> None:
        for kind, rows in counts.items():
            self.pruned.labels(kind).inc(rows)

    def watch_memory(
        self,
        held: Callable[[], int],
        evicted: Callable[[], int],
        inventory: Callable[[], tuple[int, int]] | None = None,
    ) -> None:
        """This replica's lifecycle memory (service.Collector.resident, .evicted) and, when given,
        the owner hints and witness it holds (inventory_memory.py), read at scrape time."""
        r = self.registry
        held_gauge = Gauge(
            "kvmeter_lifecycle_resources_held", "Resources whose lifecycle is held in memory", registry=r
        )
        held_gauge.set_function(held)
        Gauge(
            "kvmeter_lifecycle_resources_evicted",
            "Resources whose closed lifecycle left memory (reloaded from the store when read)",
            registry=r,
        ).set_function(evicted)
        if inventory is not None:
            Gauge(
                "kvmeter_owner_hints_held", "Owner hints (domain uuid or name) held in memory", registry=r
            ).set_function(lambda: inventory()[0])
            Gauge(
                "kvmeter_domain_witness_held", "Domains whose agents' witness is held in memory", registry=r
            ).set_function(lambda: inventory()[1])

    def record(self, out: Outcome) -> None:
        self.batches.inc(out.batches)
        self.duplicates.inc(out.duplicates)
        self.measures.inc(out.measures)
        self.billed_bytes.inc(out.billed_bytes)
        self.parked.inc(out.parked)
        self.unparked.inc(out.unparked)
        self.unattributed.inc(out.unattributed)
        self.quarantined.inc(out.quarantined)
        self.events.inc(out.events)
        self.records.inc(out.records)
        self.adjustments.inc(out.adjustments)
        self.finalized.inc(out.finalized)
        self.pruned_bytes.inc(out.pruned_bytes)
        for letter in out.dead_letters:
            self.dead_letters.labels(letter.source, letter.reason).inc()
