"""Who owns a measure's bytes: instance -> owner hint -> operator map -> MAC -> IP, at its time.

    OwnerIndex(histories: Mapping[str, ResourceHistory] | None = None,
               routers: Mapping[str, str] | None = None)
    OwnerIndex.update(history: ResourceHistory) -> None   # after rebuilding one resource
    OwnerIndex.remove(resource_uuid: str) -> None
    OwnerIndex.history(resource_uuid: str) -> ResourceHistory | None
    OwnerIndex.owner_at(measure: Measure, open_from: int | None = None) -> str | None
    is_router(domain_name: str) -> bool
    running_near(history, at) -> bool / running_since(history) -> int   # the stopped-VM doubt

Order of evidence, first hit wins (the measure's time is its start_ms):
1. The operator's map `routers` (account uuid by domain name or VM uuid; MAC and IP keys are
   used in step 6): an override, for routers and other domains of releases without <metadata>.
2. The lifecycle history of measure.instance_uuid (libvirt domain uuid == CloudStack VM uuid):
   the owner at that time, from usage events (for a router: the reconciler's ROUTER.OWNER
   events, the owner of the network it serves).
3. The agent-supplied <metadata> owner hint (`ownerAccountUuid`; "unknown" / "" mean none). For a
   virtual router (r-<id>-VM) this is the owner of its network: CloudStack gives a VR the
   account of the network it serves.
4. The MAC, when the VMs seen with it in lifecycle events and alive at that time (created, up
   to CLOCK_SKEW_MS early, and not destroyed) all have one owner.
5. The IP, likewise: IP-address resources (NET.IPASSIGN) count only while assigned, VMs (NIC IPs
   from job results) only while not destroyed; more than one owner -> None.
6. The operator's map again, by MAC, then by IP, for a MAC / IP that no lifecycle event named:
   the bus gives no address for IPs allocated without an API job (e.g. source NAT), so a legacy
   five-field measure that carries only its address needs this to be billed.
Otherwise None: the owner is never guessed; the adapter parks the measure and retries when
lifecycle arrives.

A stopped VM sends nothing, so bytes of a VM at a time its history has it stopped (more than
CLOCK_SKEW_MS from any running segment) mean events not here yet: CloudStack moves a VM to
another account only while it is stopped (assignVirtualMachine), and the new owner's VM.START
may come after its first bytes. With `open_from` (the first window not yet final) such a measure
in a window still open has no owner yet: it parks, and its VM's next event bills it, to the
owner that event names; the tick bills what is left by the history as it is just before its
window is made final (parked_path). A VM never seen running has nothing to doubt.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Mapping, MutableMapping

from kvmeter.collector.model import Measure, ResourceHistory, Segment

OWNER_HINT_KEY = "ownerAccountUuid"
# Hosts' and management servers' clocks differ: a VM's MAC / IP may show traffic slightly
# before its first event.
CLOCK_SKEW_MS = 300_000
_UNKNOWN_HINTS = frozenset({"", "unknown", "null", "none"})
_ROUTER_NAME = re.compile(r"^r-\d+-")


def is_router(domain_name: str) -> bool:
    """True for CloudStack virtual-router domain names (r-<id>-<instance>)."""
    return bool(_ROUTER_NAME.match(domain_name))


class OwnerIndex:
    """Lookup tables over resource histories; update per resource as events arrive."""

    def __init__(
        self, histories: Mapping[str, ResourceHistory] | None = None, routers: Mapping[str, str] | None = None
    ) -> None:
        self.routers: dict[str, str] = dict(routers or {})
        # <metadata> owner fields by domain uuid and name, for measures whose batch carried no
        # inventory (the adapter keeps it filled from earlier batches).
        self.hints: MutableMapping[str, dict[str, str]] = {}
        self._histories: dict[str, ResourceHistory] = {}
        self._by_mac: dict[str, set[str]] = {}
        self._by_ip: dict[str, set[str]] = {}
        for history in (histories or {}).values():
            self.update(history)

    def update(self, history: ResourceHistory) -> None:
        """Replace what the index knows about history.resource_uuid."""
        self.remove(history.resource_uuid)
        uuid = history.resource_uuid
        self._histories[uuid] = history
        for mac in history.macs:
            self._by_mac.setdefault(mac, set()).add(uuid)
        for ip in _ips(history):
            self._by_ip.setdefault(ip, set()).add(uuid)

    def remove(self, resource_uuid: str) -> None:
        old = self._histories.pop(resource_uuid, None)
        if old is None:
            return
        for table, keys in ((self._by_mac, old.macs), (self._by_ip, _ips(old))):
            for key in keys:
                holders = table.get(key)
                if holders is not None:
                    holders.discard(resource_uuid)
                    if not holders:
                        del table[key]

    def history(self, resource_uuid: str) -> ResourceHistory | None:
        return self._histories.get(resource_uuid)

    def owner_at(self, measure: Measure, open_from: int | None = None) -> str | None:
        """The account owning the measure's bytes at measure.start_ms, or None if not known (or
        doubted: a stopped VM's bytes in a window from `open_from` on)."""
        at = measure.start_ms
        for name in (measure.domain_name, measure.instance_uuid):
            if name and self.routers.get(name):
                return self.routers[name]  # the operator's word overrides what was learned
        history = self._histories.get(measure.instance_uuid) if measure.instance_uuid else None
        if history is not None:
            owner = history.owner_at(at)
            if owner:
                if open_from is not None and at >= open_from and not running_near(history, at):
                    return None  # a stopped VM's bytes: events not here yet (module doc)
                return owner
        fields = (
            measure.owner_hint
            or self.hints.get(measure.instance_uuid)
            or self.hints.get(measure.domain_name)
            or {}
        )
        hint = fields.get(OWNER_HINT_KEY, "")
        if hint.strip().lower() not in _UNKNOWN_HINTS:
            return hint
        if measure.mac:
            owner = self._single_owner(self._by_mac.get(measure.mac.lower(), set()), at, None)
            if owner:
                return owner
        if measure.address:
            owner = self._single_owner(self._by_ip.get(measure.address, set()), at, measure.address)
            if owner:
                return owner
        for key, known in ((measure.mac.lower(), self._by_mac), (measure.address, self._by_ip)):
            if key and key not in known and self.routers.get(key):
                return self.routers[key]  # only for what lifecycle knows nothing about
        return None

    def _single_owner(self, uuids: set[str], at: int, address: str | None) -> str | None:
        owners: set[str] = set()
        for uuid in uuids:
            history = self._histories[uuid]
            if address is not None and any(seg.address == address for seg in history.ip):
                # An IP-address resource: it is this account's only while assigned.
                held = [s for s in history.ip if s.address == address and s.start_ms <= at]
                if not any(s.end_ms is None or at < s.end_ms for s in held):
                    continue
            elif not _alive_at(history, at):
                continue  # a VM not yet created, or destroyed, whose MAC / IP another VM has
            owner = history.owner_at(at)
            if owner is None:
                return None  # a holder with unknown owner: any answer would be a guess
            owners.add(owner)
        return owners.pop() if len(owners) == 1 else None


def running_near(history: ResourceHistory, at: int) -> bool:
    """True when `at` is in one of the VM's running segments, widened by CLOCK_SKEW_MS each way
    (a tap is up before CloudStack stamps VM.START; the last poll's bytes may follow VM.STOP), or
    when the history has no running segment (a router, an IP address, a VM never seen running)."""
    if not history.running:
        return True
    # Segments are in time order and apart: only the last one starting (widened) by `at` can hold it.
    i = bisect_right(history.running, at + CLOCK_SKEW_MS, key=_start)
    last = history.running[i - 1] if i else None
    return last is not None and (last.end_ms is None or at < last.end_ms + CLOCK_SKEW_MS)


def _start(segment: Segment) -> int:
    return segment.start_ms


NO_DOUBT = -(2**63)  # running_since of a history whose bytes are never doubted
ALL_DOUBTED = 2**63


def running_since(history: ResourceHistory) -> int:
    """From when on every measure of this history is running_near: the open running segment's
    start less the skew (ALL_DOUBTED when no segment is open, NO_DOUBT when there is none)."""
    if not history.running:
        return NO_DOUBT
    last = history.running[-1]
    return last.start_ms - CLOCK_SKEW_MS if last.end_ms is None else ALL_DOUBTED


def _alive_at(history: ResourceHistory, at: int) -> bool:
    """False when the VM's segments all start after `at` (beyond clock skew) or all closed by then.

    A VM without segments has an unknown lifetime: alive.
    """
    segments = (*history.running, *history.allocated)
    if not segments:
        return True
    if min(s.start_ms for s in segments) > at + CLOCK_SKEW_MS:
        return False
    return any(s.end_ms is None or at < s.end_ms for s in segments)


def _ips(history: ResourceHistory) -> set[str]:
    return {seg.address for seg in history.ip if seg.address} | set(history.addresses)
