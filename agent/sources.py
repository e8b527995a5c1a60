"""Where counters come from: one small interface for every counter source.

The kernel's table (/proc/net/dev, counters.KernelTable) counts every host link and is read once
per poll; its rows are keyed by the links' ifindexes. The other sources count domain NICs that
have no host link in this namespace (vhost-user through libvirt's interfaceStats; OVS or SR-IOV
VF counters would be more of them): the daemon asks each the NICs it claims, and keys their rows
by name per boot. A new source is a module with a class like these and an entry in nic_sources;
the daemon has no branch per source.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from kvmeter.agent.counters import CounterTable
from kvmeter.agent.libvirt_counters import LibvirtInterfaceStats, StatsByInterface
from kvmeter.agent.model import DomainInfo, NicInfo

# A domain NIC and its host-side name (libvirt's target dev)
Owned = tuple[str, DomainInfo, NicInfo]


class CounterSource(Protocol):
    def claims(self, nic: NicInfo) -> bool:
        """Whether this source counts the NIC when the host has no link of its name."""
        ...

    def read(self, nics: Sequence[Owned]) -> CounterTable:
        """Host-side counters as columns (rx = what the host side received, i.e. the VM sent),
        for the NICs given; a NIC it could not read is left out. The kernel's table gives every
        link and needs no list."""
        ...


def nic_sources(inventory: StatsByInterface, timeout: float) -> tuple[CounterSource, ...]:
    """The sources of NICs without a host link, in the order they are asked (the first that
    claims a NIC counts it)."""
    return (LibvirtInterfaceStats(inventory, timeout),)
