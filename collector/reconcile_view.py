"""What reconciliation compares CloudStack's answer with: kvmeter's view of each resource
(reconcile.View), and what a pass finds (Findings). Shared by reconcile and its parts."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from kvmeter.collector.correction import Correction
from kvmeter.collector.lifecycle_order import MAX_SKEW_MS
from kvmeter.collector.model import ResourceHistory, Segment
from kvmeter.collector.witness import Witness
from kvmeter.proto import pb

SCALING = frozenset({"VM.UPGRADE", "VM.DYNAMIC.SCALE", "VM.SCALE"})


@dataclass(frozen=True)
class View:
    """kvmeter's current knowledge: histories, each resource's latest event time, the latest
    time an event told of a VM's scaling, and the agents' witness per domain uuid."""

    histories: Mapping[str, ResourceHistory]
    last_event_ms: Mapping[str, int] = field(default_factory=dict)
    scaled_ms: Mapping[str, int] = field(default_factory=dict)
    witness: Mapping[str, Witness] = field(default_factory=dict)


@dataclass
class Findings:
    corrections: list[Correction] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # differences seen and left alone, and why


def view_of(
    events: Mapping[str, Iterable[pb.LifecycleEvent]],
    histories: Mapping[str, ResourceHistory],
    witness: Mapping[str, Witness] | None = None,
) -> View:
    """A View from each resource's events (times of 0 — async jobs without a date — skipped)."""
    last: dict[str, int] = {}
    scaled: dict[str, int] = {}
    for resource, evs in events.items():
        for ev in evs:
            if ev.time <= 0:
                continue
            last[resource] = max(last.get(resource, 0), ev.time)
            if ev.event_type in SCALING:
                scaled[resource] = max(scaled.get(resource, 0), ev.time)
    return View(histories, last, scaled, dict(witness or {}))


def read_after(taken_ms: int, event_ms: int) -> bool:
    """Whether a pass read at taken_ms (the collector's clock) surely read after an event stamped
    event_ms (a management server's clock): later by more than the clock skew between them
    (lifecycle_order.MAX_SKEW_MS); a read closer to the event may have come before it."""
    return taken_ms > event_ms + MAX_SKEW_MS


def open_segment(segments: list[Segment]) -> Segment | None:
    return segments[-1] if segments and segments[-1].end_ms is None else None
