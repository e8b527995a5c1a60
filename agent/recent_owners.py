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
_NO_OWNER = (None, None)


class RecentOwners:
    """``left(old, new, now)``: record the owners in `old` (a by-device map) of running domains
    that `new` no longer gives the device (stopped, gone, NIC unplugged); ``get(device)``: the
    last one recorded, if not older than ``keep`` seconds."""

    def __init__(self, keep: float = KEEP_SECONDS) -> None:
        self.keep = keep
        self._owners: dict[str, tuple[Owner, float]] = {}

    def left(self, old: Mapping[str, Owner], new: Mapping[str, Owner], now: float) -> None:
        owners = self._owners
        for device, (domain, nic) in old.items():
            if domain.state in INACTIVE_STATES:
                continue
            now_domain, now_nic = new.get(device, _NO_OWNER)
            # (a domain read again unchanged keeps its objects: the same owner, nothing left)
            if now_domain is not domain or now_nic is not nic:
                owners[device] = ((domain, nic), now)
        if owners:
            expired = [d for d, (_, since) in owners.items() if now - since > self.keep]
            for device in expired:
                del owners[device]

    def get(self, device: str, now: float) -> Owner | None:
        found = self._owners.get(device)
        return found[0] if found is not None and now - found[1] <= self.keep else None
