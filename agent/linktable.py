"""The links of one network namespace and where each sits: :class:`LinkTable` holds what link
messages say (:class:`LinkRecord`), answers placements (bridge, uplink VLAN/VXLAN, traffic type),
keeps them across changes that cannot move them, and turns messages into :class:`LinkEvent` s.
Pure: no I/O, no clock, not thread-safe (:class:`kvmeter.agent.topology.Topology` feeds it and
locks it)."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from kvmeter.agent.model import SLOTS, LinkPlacement
from kvmeter.agent.traffic import TrafficRules

RTM_NEWLINK = 16
RTM_DELLINK = 17
UPLINK_KINDS = ("vlan", "vxlan")
LOWER_DEVICE_KINDS = ("macvtap", "macvlan", "ipvlan", "ipvtap")  # IFLA_LINK is their parent
# Links QEMU reads and writes as the guest's queue: they count as the guest does (rx = what the
# guest received), as libvirt's own interface stats take them
GUEST_SIDE_KINDS = ("macvtap", "ipvtap")
DATAPATH_KINDS = ("openvswitch",)  # a master that is a switch's datapath (ovs-system), no bridge
CHANGE_LOG_SIZE = 1 << 16  # link changes remembered for changed_since (a reader further behind rebuilds)

# (rx_bytes, rx_packets, tx_bytes, tx_packets), host side, as the kernel counts them.
Stats = tuple[int, int, int, int]


@dataclass(frozen=True, **SLOTS)
class LinkEvent:
    """A link appeared (``kind="new"``), was deleted (``kind="del"``), renamed
    (``kind="rename"``: the same device and counters under a new name, ``was`` the old one) or
    left its master (``kind="move"``: a tap taken off its bridge, to another or to none; ``was``
    its previous name when the same message renamed it too).

    ``stats`` are the counters carried by the message itself (``IFLA_STATS64``): for ``del``
    they are the interface's final counters, taken by the kernel as it removed the device, so
    the bytes between the last poll and a VM stop/reboot/unplug are not lost; for ``move`` its
    counters as it left the master (what it moved there: that place's traffic type, ``left``;
    a ``del``'s ``left`` types its last bytes when it moved since the last poll). ``stats``
    is None when the message had none, and for ``del`` events synthesised after a netlink overrun (the
    link vanished while events were being dropped; its tail is unknown). No timestamp: the
    consumer stamps time when it receives the event.

    Taps (KVM's NICs) count their own traffic, so their ``del`` stats are complete both ways. A
    veth reads its rx from its peer and veth unlinks the pair before the kernel builds the
    message: a veth's ``del`` carries its tx but rx 0 (tests that model VMs with veths take
    note).
    """

    kind: str  # "new" | "del" | "rename" | "move"
    ifname: str
    ifindex: int
    stats: Stats | None = None
    was: str | None = None  # a rename's previous name (a move's, when it was renamed too)
    left: LinkPlacement | None = None  # a move's or del's: where the link sat until then
    # a del's: the link's MAC (whose NIC's tap it was); left out of comparisons
    address: str | None = field(default=None, compare=False)


@dataclass(frozen=True, **SLOTS)
class LinkRecord:
    """What one link message says about a link."""

    ifindex: int
    ifname: str
    kind: str | None = None  # IFLA_INFO_KIND: bridge, veth, tun, vxlan, vlan, macvtap, ...
    master: int | None = None  # IFLA_MASTER: the bridge (or bond, ovs-system) it is a port of
    link: int | None = None  # IFLA_LINK: parent (vlan, macvtap) or peer (veth) ifindex
    vlan_id: int | None = None
    vxlan_vni: int | None = None
    stats: Stats | None = None
    address: str | None = None  # IFLA_ADDRESS, aa:bb:cc:dd:ee:ff (a tap's MAC)


class LinkTable:
    """All links of one network namespace, by ifindex. Pure: no I/O, no clock, not thread-safe."""

    def __init__(self, rules: TrafficRules) -> None:
        self.rules = rules
        self._links: dict[int, LinkRecord] = {}
        self._by_name: dict[str, int] = {}
        self._names_view: dict[str, int] | None = None  # links()'s copy, until the next change
        self._uplink_of: dict[int, LinkRecord] | None = None  # bridge ifindex -> uplink port
        self._placements: dict[str, LinkPlacement] = {}
        # master ifindex -> the placement of its ports (shared: every VM tap on a bridge has the
        # same one; a storm's new taps find theirs made)
        self._port_placements: dict[int, LinkPlacement] = {}
        # ifindex -> how many links' placements read it: their master, a macvtap's parent
        self._read_by: dict[int, int] = {}
        # Bumped on every change: a reader that saw the same generation saw the same links and
        # placements (the poll loop keeps what it derives from them until this moves).
        self.generation = 0
        # The names of the links each generation changed, in order, complete after _log_start
        # (a change that may move every placement empties it): see changed_since.
        self._log_generations: list[int] = []
        self._log_names: list[str] = []
        self._log_start = 0

    def __len__(self) -> int:
        return len(self._links)

    def apply(self, msg_type: int, record: LinkRecord) -> LinkEvent | None:
        """Apply one message; return the event it means, if any.

        ``RTM_NEWLINK`` for an unknown ifindex -> ``new``; for a known one under a new name
        (``ip link set vnet0 name tap-x``) -> ``rename``; for a known link off the master it
        had (``ip link set vnet0 nomaster``, or ``master`` another) -> ``move``; else it only
        updates the record (a first master, state changes). ``RTM_DELLINK``
        -> ``del`` always, even for a link the table never saw (it may have been created and
        deleted between the dump and the subscription).
        """
        if msg_type == RTM_DELLINK:
            # where it sat until then (a link moved since the last poll: its last bytes' place)
            known = self._links.get(record.ifindex)
            left = self.placement(known.ifname) if known is not None else None
            address = record.address or (known.address if known is not None else None)
            self._remove(record.ifindex)
            return LinkEvent("del", record.ifname, record.ifindex, record.stats, left=left, address=address)
        previous = self._links.get(record.ifindex)
        if previous is not None and _same_place(previous, record):
            return None
        moving = previous is not None and previous.master is not None and previous.master != record.master
        # read before the record changes (under the name it had: one message may rename it too)
        left = self.placement(previous.ifname) if previous is not None and moving else None
        if previous is not None:
            self._remove(record.ifindex)
        self._links[record.ifindex] = _kept(record)
        self._by_name[record.ifname] = record.ifindex
        for index in _reads(record):
            self._read_by[index] = self._read_by.get(index, 0) + 1
        self._changed(record)
        if previous is None:
            return LinkEvent("new", record.ifname, record.ifindex, record.stats)
        if previous.ifname != record.ifname:
            # Renamed and moved by one message (a read's rename superseded by the move after it):
            # one move, with its previous name, so its bytes until now are its old place's still
            kind = "move" if moving else "rename"
            return LinkEvent(kind, record.ifname, record.ifindex, record.stats, previous.ifname, left)
        if moving:
            # Its bytes until now are its old place's: the message's counters split them (a tap's
            # first master, as libvirt plugs it, is no move: nothing was typed before it)
            return LinkEvent("move", record.ifname, record.ifindex, record.stats, left=left)
        return None

    def replace_all(self, records: Iterable[LinkRecord]) -> list[LinkEvent]:
        """Replace the table with a full dump; return events for what differs from before
        (``del`` without stats for links gone unseen, ``new`` for links that appeared,
        ``rename`` for those under another name, ``move`` with the dump's counters for those
        off the master they had, as ``apply`` tells them)."""
        fresh = {r.ifindex: r for r in records}
        events = [
            LinkEvent("del", old.ifname, old.ifindex, None)
            for index, old in sorted(self._links.items())
            if index not in fresh
        ]
        for index, new in sorted(fresh.items()):
            old = self._links.get(index)
            if old is None:
                events.append(LinkEvent("new", new.ifname, index, new.stats))
            elif old.master is not None and old.master != new.master:
                # A move whose own message the overrun lost: the dump's counters split its bytes,
                # those up to the dump its old place's (the move may have come before: see README)
                was = old.ifname if old.ifname != new.ifname else None
                events.append(
                    LinkEvent("move", new.ifname, index, new.stats, was, self.placement(old.ifname))
                )
            elif old.ifname != new.ifname:
                events.append(LinkEvent("rename", new.ifname, index, new.stats, old.ifname))
        self._links = {index: _kept(record) for index, record in fresh.items()}
        self._by_name = {r.ifname: r.ifindex for r in fresh.values()}
        self._read_by = {}
        for record in fresh.values():
            for index in _reads(record):
                self._read_by[index] = self._read_by.get(index, 0) + 1
        self._changed()
        return events

    def ifindex(self, ifname: str) -> int | None:
        return self._by_name.get(ifname)

    def changed_since(self, generation: int) -> set[str] | None:
        """The names of the links that came, went or moved after `generation` (the only ones
        whose ifindex or placement may differ from what a reader saw then); None when every
        placement may have changed since (a bridge or an uplink changed, a re-dump, new rules)
        or the reader is too far behind."""
        if generation < self._log_start:
            return None
        return set(self._log_names[bisect_right(self._log_generations, generation) :])

    def links(self) -> dict[str, int]:
        """Name -> ifindex of every link: one copy per change, the same object until the next
        (the poll loop sees an unchanged map by identity, no copy nor comparison of thousands
        of entries per poll). Readers must not change it."""
        if self._names_view is None:
            self._names_view = dict(self._by_name)
        return self._names_view

    def record(self, ifname: str) -> LinkRecord | None:
        index = self._by_name.get(ifname)
        return self._links.get(index) if index is not None else None

    def record_at(self, ifindex: int) -> LinkRecord | None:
        return self._links.get(ifindex)

    def address(self, ifname: str, ifindex: int) -> str | None:
        """The link's MAC as its last link message gave it (None: not that link, or none given)."""
        record = self.record(ifname)
        return record.address if record is not None and record.ifindex == ifindex else None

    def placement(self, ifname: str) -> LinkPlacement:
        """Bridge = the link's master; uplink = that bridge's VLAN or VXLAN port (lowest ifindex
        if several). A macvtap/macvlan has no bridge; its parent is the uplink when that is a
        VLAN/VXLAN device, else stands for its bridge. Unknown names get an unplaced placement
        classified by the rules."""
        cached = self._placements.get(ifname)
        if cached is not None:
            return cached
        record = self.record(ifname)
        bridge: LinkRecord | None = None
        uplink: LinkRecord | None = None
        guest_side = record is not None and record.kind in GUEST_SIDE_KINDS
        if record is not None and record.master is not None and not guest_side:
            shared = self._port_placements.get(record.master)
            if shared is not None:
                self._placements[ifname] = shared
                return shared
            bridge = self._links.get(record.master)
            if bridge is not None and bridge.kind in DATAPATH_KINDS:
                # Open vSwitch: every port's master, whichever OVS bridge and VLAN tag the port
                # has (libvirt's XML says those: kvmeter.agent.nic_placement)
                bridge = None
            elif bridge is not None:
                uplink = self._uplinks().get(bridge.ifindex)
        elif record is not None and record.kind in LOWER_DEVICE_KINDS and record.link is not None:
            lower = self._links.get(record.link)
            if lower is not None and lower.kind in UPLINK_KINDS:
                uplink = lower
            else:  # on an untagged device (eth1, a bond): a rule's `bridge` names that device
                bridge = lower
        bridge_name = bridge.ifname if bridge is not None else None
        vlan_id = uplink.vlan_id if uplink is not None else None
        vni = uplink.vxlan_vni if uplink is not None else None
        placement = LinkPlacement(
            bridge=bridge_name,
            vlan_id=vlan_id,
            vxlan_vni=vni,
            traffic_type=self.rules.classify(bridge_name, vlan_id, vni),
            uplink=uplink.ifname if uplink is not None else None,
            guest_side=guest_side,
        )
        if record is not None:
            self._placements[ifname] = placement
            if record.master is not None and not guest_side:
                self._port_placements[record.master] = placement
        return placement

    def _uplinks(self) -> dict[int, LinkRecord]:
        if self._uplink_of is None:
            uplinks: dict[int, LinkRecord] = {}
            for record in sorted(self._links.values(), key=lambda r: r.ifindex, reverse=True):
                if record.master is not None and record.kind in UPLINK_KINDS:
                    uplinks[record.master] = record
            self._uplink_of = uplinks
        return self._uplink_of

    def _remove(self, ifindex: int) -> None:
        old = self._links.pop(ifindex, None)
        if old is not None:
            if self._by_name.get(old.ifname) == ifindex:
                del self._by_name[old.ifname]
            for index in _reads(old):
                left = self._read_by[index] - 1
                if left:
                    self._read_by[index] = left
                else:
                    del self._read_by[index]
            self._changed(old)

    def _changed(self, record: LinkRecord | None = None) -> None:
        """A link came, went or moved (None: all of them). Placements computed before stay
        valid unless they could depend on it: a VM's tap coming or going changes no other
        link's placement, so a host of thousands keeps them when one VM starts or stops."""
        self.generation += 1
        self._names_view = None
        if record is None or self._others_depend_on(record):
            self._uplink_of = None
            self._placements = {}
            self._port_placements = {}
            self._log_generations, self._log_names = [], []
            self._log_start = self.generation
        else:
            self._placements.pop(record.ifname, None)
            self._port_placements.pop(record.ifindex, None)  # computed while no port read it
            if len(self._log_names) >= CHANGE_LOG_SIZE:
                half = CHANGE_LOG_SIZE // 2
                self._log_start = self._log_generations[half - 1]
                del self._log_generations[:half], self._log_names[:half]
            self._log_generations.append(self.generation)
            self._log_names.append(record.ifname)

    def _others_depend_on(self, record: LinkRecord) -> bool:
        """Whether another link's placement may read this one: a bridge or other master, an
        uplink (VLAN/VXLAN device), or the parent of a macvtap and the like."""
        if record.kind == "bridge" or record.kind in UPLINK_KINDS:
            return True
        return record.ifindex in self._read_by


def _kept(record: LinkRecord) -> LinkRecord:
    """A record as the table keeps it: without the counters its message carried (only that
    message's event needs them; ten thousand links would keep ~2 MB of them)."""
    return record if record.stats is None else replace(record, stats=None)


def _reads(record: LinkRecord) -> tuple[int, ...]:
    """The other links a link's placement reads: its master, and a macvtap's (or the like's)
    parent. Not a veth's IFLA_LINK: that is its peer, often in another namespace, whose
    ifindex may be anything here."""
    master = (record.master,) if record.master is not None else ()
    if record.link is not None and record.kind in LOWER_DEVICE_KINDS:
        return (*master, record.link)
    return master


def _same_place(a: LinkRecord, b: LinkRecord) -> bool:
    """Equal apart from counters (which change on every message)."""
    return (a.ifname, a.kind, a.master, a.link, a.vlan_id, a.vxlan_vni) == (
        b.ifname,
        b.kind,
        b.master,
        b.link,
        b.vlan_id,
        b.vxlan_vni,
    )
