"""Which resources a replica keeps in memory, and the little it remembers of those it let go.
Pure: no I/O, no clock.

    evictable(history, last_event_ms, cutoff_ms) -> bool
    Evicted()                       # the uuids, MACs and addresses of resources out of memory
    Evicted.add(history) / .discard(history) / .wanted(uuid, mac, address, start_ms) -> set[str]

A resource whose lifecycle is closed (every segment ended: destroyed, released, stopped for
good) before the cutoff may leave memory: its events stay in the store and it is rebuilt from
them, whole, when anything could read it again, so every answer is the one it would have been
had it never left. What can read a resource:
- an event of it (the collector reloads it before learning the event);
- a measure naming its instance uuid (attribution step 2, at any time: a destroyed VM's uuid
  still names its last owner);
- a measure carrying one of its MACs or addresses and starting before its last segment ended:
  attribution by MAC / IP counts a VM only while alive and an IP-address resource only while
  assigned, so later measures never need it (Evicted.watermark is the latest such end);
- the reconciler, for the resources CloudStack lists.
A resource with no segment has no end: it leaves only without MACs and addresses (volumes,
templates and the like, read by uuid alone) and when its last event is before the cutoff.
What stays per evicted resource is its uuid and its MACs and addresses (a few hundred bytes
instead of its events and history).
"""

from __future__ import annotations

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
    """The resources out of memory: their uuids, and by MAC / address the uuids that carry it."""

    def __init__(self) -> None:
        self.uuids: set[str] = set()
        self._by_key: dict[str, tuple[str, ...]] = {}
        # Measures starting at or after this instant never need an evicted resource's MACs or
        # addresses: every such resource's segments had ended by then.
        self.watermark = -(2**62)

    def __len__(self) -> int:
        return len(self.uuids)

    def __contains__(self, uuid: object) -> bool:
        return uuid in self.uuids

    def add(self, history: ResourceHistory) -> None:
        uuid = history.resource_uuid
        self.uuids.add(uuid)
        for key in _keys(history):
            held = self._by_key.get(key, ())
            if uuid not in held:
                self._by_key[key] = (*held, uuid)
        end = last_end(history)
        if end is not None and end > self.watermark:
            self.watermark = end

    def discard(self, history: ResourceHistory) -> None:
        """Forget an evicted resource brought back; `history` is rebuilt from the store, which
        only adds events, so its keys cover those it left with."""
        uuid = history.resource_uuid
        self.uuids.discard(uuid)
        for key in _keys(history):
            held = self._by_key.get(key)
            if held is not None and uuid in held:
                rest = tuple(u for u in held if u != uuid)
                if rest:
                    self._by_key[key] = rest
                else:
                    del self._by_key[key]

    def wanted(self, uuid: str, mac: str, address: str, start_ms: int) -> set[str]:
        """The evicted resources a measure's attribution may read."""
        out = {uuid} if uuid and uuid in self.uuids else set()
        if start_ms < self.watermark:
            for key in (mac.lower(), address):
                if key:
                    out.update(self._by_key.get(key, ()))
        return out
