"""Counters of NICs the host cannot see (vhost-user: the guest's queues are in a userspace
switch, no kernel interface here) from libvirt's interfaceStats, one call per NIC with a timeout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from kvmeter.agent.counters import CounterTable, Stats
from kvmeter.agent.model import DomainInfo, NicInfo

# NIC types whose host side has no kernel interface in this namespace: counters come from libvirt.
LIBVIRT_COUNTED_NIC_TYPES = frozenset({"vhostuser"})


class StatsByInterface(Protocol):
    def interface_stats(self, uuid: str, device: str, timeout: float = 2.0) -> Stats | None: ...


def libvirt_counted(nic: NicInfo) -> bool:
    return nic.nic_type in LIBVIRT_COUNTED_NIC_TYPES


class LibvirtInterfaceStats:
    """The counter source of vhost-user NICs (agent.sources.CounterSource)."""

    def __init__(self, inventory: StatsByInterface, timeout: float) -> None:
        self.inventory = inventory
        self.timeout = timeout

    def claims(self, nic: NicInfo) -> bool:
        return libvirt_counted(nic)

    def read(self, nics: Sequence[tuple[str, DomainInfo, NicInfo]]) -> CounterTable:
        table = CounterTable([], [], [], [], [])
        for name, domain, _nic in nics:
            stats = self.inventory.interface_stats(domain.uuid, name, timeout=self.timeout)
            if stats is None:
                continue
            # libvirt reports these from the guest's side already; the engine and the measure
            # builder work host-side, so turn them back (the builder swaps them again).
            rx_bytes, rx_packets, tx_bytes, tx_packets = stats
            table.names.append(name)
            table.rx_bytes.append(tx_bytes)
            table.rx_packets.append(tx_packets)
            table.tx_bytes.append(rx_bytes)
            table.tx_packets.append(rx_packets)
        return table
