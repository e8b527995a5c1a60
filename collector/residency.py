"""Which resources a replica keeps in memory, and the little it remembers of those it let go.
Pure: no I/O, no clock.

    evictable(history, last_event_ms, cutoff_ms) -> bool
    Evicted()                       # how many are out of memory, and when the latest of them ended
    Evicted.add(history) -> rows    # (key, uuid, last end): what the store keeps to find it again
    Evicted.discard()
    holders_wanted(rows, starts)    # of the stored rows, the resources measures may read

A resource whose lifecycle is closed (every segment ended: destroyed, released, stopped for
good) before the cutoff may leave memory: its events stay in the store and it is rebuilt from
them, whole, when anything could read it again, so every answer is the one it would have been
had it never left. What can read a resource:
- an event of it (the collector reloads it before learning the event);
- a measure naming its instance uuid (attribution step 2, at any time: a destroyed VM's uuid
  still names its last owner): a uuid not in memory with stored events is one that left;
- a measure carrying one of its MACs or addresses and starting before its last segment ended:
  attribution by MAC / IP counts a VM only while alive and an IP-address resource only while
  assigned, so later measures never need it (Evicted.watermark is the latest such end);
- the reconciler, for the resources CloudStack lists.
A resource with no segment has no end: it leaves only without MACs and addresses (volumes,
templates and the like, read by uuid alone) and when its last event is before the cutoff.
Nothing per evicted resource stays in memory: its MACs and addresses go to the store
(schema_residency.evicted_keys) with its last end, its uuid is found by its stored events.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from kvmeter.collector.model import ResourceHistory


def _keys(history: ResourceHistory) -> set[str]:
    """The MACs and addresses attribution may find this resource by (attribution._ips, macs)."""
    return {*history.macs, *history.addresses, *(s.address for s in history.ip if s.address)}


def last_end(history: ResourceHistory) -> int | None:
    """When the last segment ended; None when one is open or there is none."""
    ends = [s.end_ms for s in (*history.running, *history.allocated, *history.ip)]
    if not ends or None in ends:
        return None
    return max(e for e in ends if e is not None)


def evictable(history: ResourceHistory, last_event_ms: int, cutoff_ms: int) -> bool:
    """Closed, and nothing of it happened after cutoff_ms (see the module doc)."""
    if last_event_ms > cutoff_ms:
        return False
    if history.running or history.allocated or history.ip:
        end = last_end(history)
        return end is not None and end <= cutoff_ms
    return not _keys(history)


class Evicted:
    """The resources out of memory: how many, and the latest end of their segments."""

    def __init__(self) -> None:
        self.count = 0
        self.ever = False  # until one leaves, nothing is looked for in the store
        # Measures starting at or after this instant never need an evicted resource's MACs or
        # addresses: every such resource's segments had ended by then.
        self.watermark = -(2**62)

    def __len__(self) -> int:
        return self.count

    def add(self, history: ResourceHistory) -> list[tuple[str, str, int]]:
        """Count it out; returns the (key, uuid, last end) rows that find it again by MAC or address."""
        self.count += 1
        self.ever = True
        end = last_end(history)
        if end is None:
            return []  # no segment: read by uuid alone (evictable leaves none with keys)
        self.watermark = max(self.watermark, end)
        return [(key, history.resource_uuid, end) for key in sorted(_keys(history))]

    def discard(self) -> None:
        """One brought back."""
        self.count = max(0, self.count - 1)


def holders_wanted(rows: Iterable[tuple[str, str, int]], starts: Mapping[str, int]) -> set[str]:
    """Of the stored (key, uuid, last end) rows, the resources a measure carrying the key and
    starting at starts[key] (the earliest such start) may be attributed to: those whose last
    segment ended after it."""
    return {uuid for key, uuid, end in rows if key in starts and starts[key] < end}
