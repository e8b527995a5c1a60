"""The NIC each host device name last belonged to while its domain ran, kept for a while after.

A tap made and deleted between two polls (a VM started and stopped, a NIC plugged and
unplugged, within one poll interval) has no owner by the poll that reads its final counters:
the domain is shut off or gone, and libvirt drops an inactive domain's target dev names. The
inventory saw it running meanwhile; this remembers what it saw. Pure: no I/O, no clock of its
own, not thread-safe (the inventory holds its lock).
"""

from __future__ import annotations

from collections.abc import Mapping

from kvmeter.agent.metered import INACTIVE_STATES
from kvmeter.agent.model import DomainInfo, NicInfo

# How long a device's last running owner is kept (seconds): well beyond a poll interval and
# the inventory's lag behind libvirt, short against the reuse of a MAC by another NIC
KEEP_SECONDS = 600.0

Owner = tuple[DomainInfo, NicInfo]


class RecentOwners:
    """``left(old, new, now)``: record the NICs of the running domains in `old` (uuid -> domain,
    the last published) that `new` does not hold as the same object (stopped, gone, read again
    changed: a NIC unplugged); ``get(device)``: the last one recorded, if not older than
    ``keep`` seconds. Only changed domains are looked at, and the records are kept oldest first,
    so expiry stops at the first one kept: a VM storm's thousands of records (libvirt names new
    taps anew) cost nothing at each of its hundreds of publishes."""

    def __init__(self, keep: float = KEEP_SECONDS) -> None:
        self.keep = keep
        self._owners: dict[str, tuple[Owner, float]] = {}

    def left(self, old: Mapping[str, DomainInfo], new: Mapping[str, DomainInfo], now: float) -> None:
        owners = self._owners
        for uuid, domain in old.items():
            if new.get(uuid) is domain or domain.state in INACTIVE_STATES:
                continue  # (a domain read again unchanged keeps its object)
            for nic in domain.nics:
                if nic.device:
                    owners.pop(nic.device, None)  # to the end: the newest
                    owners[nic.device] = ((domain, nic), now)
        expired = []
        for device, (_, since) in owners.items():  # oldest first
            if now - since <= self.keep:
                break
            expired.append(device)
        for device in expired:
            del owners[device]

    def get(self, device: str, now: float) -> Owner | None:
        found = self._owners.get(device)
        return found[0] if found is not None and now - found[1] <= self.keep else None
