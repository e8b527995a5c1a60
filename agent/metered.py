"""Which host interfaces are metered: the ones that belong to a libvirt domain's NIC.

By libvirt's target dev first. A NIC whose target dev is not a link here (libvirt's test driver
renames vnetN targets; a live XML read during a hot-plug may lack it) is matched by MAC: libvirt
gives a tap the guest MAC with 0xfe as first byte; a macvtap carries the guest MAC itself.
Everything else on the host (bridges, uplinks, the management link) is ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Mapping
from itertools import compress, filterfalse, repeat
from operator import attrgetter, is_, itemgetter

from kvmeter.agent.counters import read_link_mac
from kvmeter.agent.libvirt_counters import libvirt_counted
from kvmeter.agent.measures import UNSWAPPED_NIC_TYPES
from kvmeter.agent.model import CounterKey, DomainInfo, NicInfo

# Domains without host interfaces: their NICs are not looked for among the links.
INACTIVE_STATES = frozenset({"shutoff", "gone"})
_NAME = attrgetter("name")
_IFINDEX = attrgetter("ifindex")
_NAME_AT, _IFINDEX_AT = itemgetter(0), itemgetter(1)  # of a (name, ifindex) pair
_new_key = tuple.__new__  # a CounterKey from its fields' tuple, in C (no Python __new__ each)

Owner = tuple[DomainInfo, NicInfo]


def tap_mac(guest_mac: str) -> str:
    """The MAC libvirt gives a NIC's host-side tap: the guest MAC with 0xfe as first byte."""
    return "fe:" + guest_mac.lower().split(":", 1)[1]


def link_mac(nic: NicInfo) -> str:
    """The MAC of the host link a NIC is matched to: its tap's, a macvtap's own."""
    return nic.mac if nic.nic_type in UNSWAPPED_NIC_TYPES else tap_mac(nic.mac)


class MeteredLinks:
    """Resolves domain NICs to host links and hands out stable CounterKeys (same objects from
    poll to poll: cheap to hash and compare, and measure templates can be kept per key)."""

    def __init__(
        self,
        boot_id: str,
        read_mac: Callable[[str], str | None] = read_link_mac,
        without_link: Callable[[NicInfo], bool] = libvirt_counted,
    ) -> None:
        self.boot_id = boot_id
        self._read_mac = read_mac
        self._without_link = without_link  # NICs another counter source counts (agent.sources)
        self._macs: dict[tuple[str, int], str | None] = {}
        self._keys: dict[tuple[str, int], CounterKey] = {}
        self.last_unresolved = 0  # NICs the last resolve matched (or tried to match) by MAC
        self.last_matched = 0  # links the last resolve claimed by MAC
        # The target devs of the last resolve's unresolved NICs that are not links (a VM
        # stopping whose tap went first, as a rule)
        self.last_unlinked: set[str] = set()

    def resolve(self, domains: Iterable[DomainInfo], links: Mapping[str, int]) -> dict[str, Owner]:
        """Host interface name -> (domain, NIC). NICs counted without a host link keep their
        target dev name."""
        devices: dict[str, Owner] = {}
        unresolved: list[Owner] = []
        for domain in domains:
            # A shut-off domain's NICs meter nothing: its persistent XML may still name a link
            # (a pre-created tap, managed='no') that a running VM has now.
            if domain.state in INACTIVE_STATES:
                continue
            for nic in domain.nics:
                if nic.device and nic.device in links and nic.device not in devices:
                    devices[nic.device] = (domain, nic)
                elif not self._without_link(nic):
                    unresolved.append((domain, nic))
                elif nic.device:
                    devices[nic.device] = (domain, nic)
        self.last_unresolved = len(unresolved)
        self.last_matched = 0
        self.last_unlinked = {nic.device for _, nic in unresolved if nic.device and nic.device not in links}
        if unresolved:
            by_mac = self._link_macs(links, devices)
            for domain, nic in unresolved:
                name = by_mac.get(link_mac(nic))
                if name is not None and name not in devices:
                    devices[name] = (domain, nic)
                    self.last_matched += 1
        return devices

    def foreign(self, name: str, ifindex: int, nic: NicInfo, address: str | None = None) -> bool:
        """Whether the link carries a MAC that is not the NIC's link MAC (unknown: no). `address`:
        its MAC from its link message (no read of sysfs a tap: a storm's hundreds)."""
        mac = address or self._macs.get((name, ifindex)) or self._read_mac(name)
        return mac is not None and mac != "" and mac.lower() != link_mac(nic)

    def any_by_mac(self, nics: Iterable[NicInfo], links: Mapping[str, int], claimed: Container[str]) -> bool:
        """Whether a link not `claimed` carries one of these NICs' MACs (resolve would match
        that NIC to it)."""
        by_mac = self._link_macs(links, claimed)
        return any(link_mac(nic) in by_mac for nic in nics)

    def _link_macs(self, links: Mapping[str, int], claimed: Container[str]) -> dict[str, str]:
        """MAC -> name of the links not `claimed` (by a NIC naming them: no other NIC can have
        them), one sysfs read per link incarnation (cached by name and ifindex): a VM storm's
        new taps are all claimed, so none of them is read."""
        names = list(filterfalse(claimed.__contains__, links))
        current = list(zip(names, map(links.__getitem__, names)))
        kept = set(current)
        for key in [k for k in self._macs if k not in kept]:
            del self._macs[key]
        by_mac = {}
        for key in current:  # in the links' order: of two links with one MAC, the last
            if key not in self._macs:
                self._macs[key] = self._read_mac(key[0])
            mac = self._macs[key]
            if mac:
                by_mac[mac] = key[0]
        return by_mac

    def key(self, name: str, ifindex: int) -> CounterKey:
        """One link's CounterKey (the object keys() hands out for it)."""
        key = self._keys.get((name, ifindex))
        if key is None:
            key = self._keys[(name, ifindex)] = CounterKey(self.boot_id, ifindex, name)
        return key

    def keys_of(self, names: Iterable[str], ifindexes: Iterable[int]) -> list[CounterKey]:
        """`key` for each name and ifindex (a poll's link events, a storm's new taps): the
        cached ones looked up, the others made, by C-level passes."""
        wanted = list(zip(names, ifindexes))
        found: list[CounterKey | None] = list(map(self._keys.get, wanted))
        if None not in found:
            return found  # type: ignore[return-value]  # None no more
        new = list(compress(wanted, map(is_, found, repeat(None))))  # a pair named twice: the last
        made = map(
            _new_key, repeat(CounterKey), zip(repeat(self.boot_id), map(_IFINDEX_AT, new), map(_NAME_AT, new))
        )
        self._keys.update(zip(new, made))
        return list(map(self._keys.__getitem__, wanted))

    def keys(self, links: Mapping[str, int]) -> dict[str, CounterKey]:
        """name -> CounterKey for every link."""
        keys = dict(zip(links, self.keys_of(links, links.values())))
        self.trim(keys)
        return keys

    def trim(self, keys: Mapping[str, CounterKey]) -> None:
        """Forget the cached keys of links gone, when they outnumber the current ones."""
        if len(self._keys) > 2 * len(keys) + 64:
            kept = list(keys.values())  # C-level passes: a storm's keys pile up by thousands
            self._keys = dict(zip(zip(map(_NAME, kept), map(_IFINDEX, kept)), kept))
