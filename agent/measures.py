"""Deltas plus what inventory and topology know -> one protobuf MeasureBatch. Pure, no I/O.

Directions turn from the host's view (kernel counters) to the VM's: what a tap transmits on the
host side is what the VM received, so a tap's host tx is VM_RX. A macvtap counts from the
guest's side already and is not swapped, as libvirt itself does: libvirt's type "direct", and
a pre-created macvtap of type "ethernet" (known by its link's kind: LinkPlacement.guest_side).
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from kvmeter.agent.model import SLOTS, CounterKey, Delta, DomainInfo, LinkPlacement, NicInfo, new_tuple
from kvmeter.agent.varint import varint
from kvmeter.proto import SCHEMA_VERSION, pb

TRAFFIC_ENUM = {
    "public": pb.PUBLIC,
    "guest": pb.GUEST,
    "management": pb.MANAGEMENT,
    "storage": pb.STORAGE,
    "control": pb.CONTROL,
    "private_gateway": pb.PRIVATE_GATEWAY,
    "unknown": pb.TRAFFIC_UNKNOWN,
}
STATE_ENUM = {
    "running": pb.RUNNING,
    "paused": pb.PAUSED,
    "shutoff": pb.SHUTOFF,
    "crashed": pb.CRASHED,
    "gone": pb.GONE,
}
KIND_ENUM = {
    "user_vm": pb.USER_VM,
    "virtual_router": pb.VIRTUAL_ROUTER,
    "system_vm": pb.SYSTEM_VM,
}
# libvirt interface types whose host-side counters are already the guest's view (a "direct"
# NIC is a macvtap, also when the topology has not placed its link)
UNSWAPPED_NIC_TYPES = frozenset({"direct"})


@dataclass(frozen=True, **SLOTS)
class Attribution:
    """Which VM NIC a counter belongs to and where its host interface sits."""

    domain: DomainInfo
    nic: NicInfo
    placement: LinkPlacement


def measure_template(key: CounterKey, who: Attribution, direction: pb.Direction) -> pb.IPMeasure:
    """The fields of a measure that stay the same from poll to poll for one counter."""
    m = pb.IPMeasure(
        header=SCHEMA_VERSION,
        saddr=0,  # the agent does not know guest addresses; the collector attributes by NIC
        direction=direction,
        traffic_type=TRAFFIC_ENUM.get(who.placement.traffic_type, pb.TRAFFIC_UNKNOWN),
        device=key.name,
        mac=who.nic.mac,
        instance_uuid=who.domain.uuid,
        domain_name=who.domain.name,
        ifindex=key.ifindex,
    )
    bridge = who.placement.bridge or who.nic.bridge
    if bridge:
        m.bridge = bridge
    if who.placement.vlan_id is not None:
        m.vlan_id = who.placement.vlan_id
    if who.placement.vxlan_vni is not None:
        m.vxlan_vni = who.placement.vxlan_vni
    return m


class _Pair(NamedTuple):
    """A counter's measure templates, both directions, as wire bytes: parsed into a new
    IPMeasure (row path) or placed as they are after a measure's counts (steady path)."""

    who: Attribution  # what they were built from
    unswapped: bool  # the host-side counters are already the VM's view
    traffic_type: str
    rx_wire: bytes  # VM_RX template, serialised
    tx_wire: bytes  # VM_TX template, serialised
    ifindex: int  # the counter's, the templates' last field


_IFINDEX_TAG = b"\x88\x01"  # IPMeasure.ifindex = 17, varint: the highest field a template sets


def _ifindex_field(ifindex: int) -> bytes:
    return _IFINDEX_TAG + varint(ifindex)


def _template_pair(key: CounterKey, who: Attribution) -> _Pair:
    return _Pair(
        who,
        who.placement.guest_side or who.nic.nic_type in UNSWAPPED_NIC_TYPES,
        who.placement.traffic_type,
        measure_template(key, who, pb.VM_RX).SerializeToString(),
        measure_template(key, who, pb.VM_TX).SerializeToString(),
        key.ifindex,
    )


def _reborn_pair(old: _Pair, key: CounterKey, who: Attribution) -> _Pair | None:
    """The pair of a new incarnation of `old`'s counter (a VM's tap made again: the same name,
    domain, NIC and placement, another ifindex), from old's bytes: protobuf writes a message's
    fields in the order of their numbers, so ifindex, the highest a template sets, comes last
    and only it differs. None when old was built for anything else."""
    was = old.who
    if was is not who and (
        was.domain is not who.domain or was.nic is not who.nic or was.placement != who.placement
    ):
        return None
    suffix = _ifindex_field(old.ifindex)
    rx_wire, tx_wire = old.rx_wire, old.tx_wire
    if not (rx_wire.endswith(suffix) and tx_wire.endswith(suffix)):
        return None
    field = _ifindex_field(key.ifindex)
    cut = -len(suffix)
    # (a storm makes hundreds: the tuple without _Pair's generated __new__, a Python call)
    return new_tuple(
        _Pair,
        (who, old.unswapped, old.traffic_type, rx_wire[:cut] + field, tx_wire[:cut] + field, key.ifindex),
    )


class Templates:
    """Measure templates per counter (both directions), rebuilt when the Attribution object
    changes: starting a measure from its template is about twice as fast as setting every
    field (2,000 NICs per poll), and one lookup per counter serves both directions."""

    def __init__(self) -> None:
        self._cache: dict[CounterKey, _Pair] = {}
        # The hot loop's lookup (check the attribution itself, then call pair() on a miss)
        self.cached = self._cache.get

    def pair(self, key: CounterKey, who: Attribution) -> _Pair:
        hit = self._cache.get(key)
        if hit is not None and hit[0] is who:
            return hit
        pair = self._cache[key] = _template_pair(key, who)
        return pair

    def fill(
        self,
        pairs: list[Any],
        at: Iterable[int],
        keys: Sequence[CounterKey],
        whos: Sequence[Attribution],
        was: Mapping[str, CounterKey],
    ) -> None:
        """pairs[i] = pair(keys[i], whos[i]) for each i in `at`, the counters whose pair is
        missing or built for another attribution. A storm's new taps (`was`: their previous
        incarnations' keys by name) get their old pair's bytes with the new ifindex, rather
        than two messages built and serialised (3.5 -> 2.0 µs)."""
        cache = self._cache
        for i in at:
            key, who = keys[i], whos[i]
            old = cache.get(was.get(key.name))  # type: ignore[arg-type]  # None: no such key
            pair = _reborn_pair(old, key, who) if old is not None else None
            pairs[i] = cache[key] = pair or _template_pair(key, who)

    def keep_only(self, keys: Container[CounterKey]) -> None:
        for cached in [k for k in self._cache if k not in keys]:
            del self._cache[cached]

    def __len__(self) -> int:
        return len(self._cache)


def _add_measure(into: Any, template: bytes, nbytes: int, npackets: int, delta: Delta) -> pb.IPMeasure:
    m = into.add()
    m.MergeFromString(template)
    m.bytes = nbytes
    m.packets = npackets
    m.start = delta.start_ms
    m.end = delta.end_ms
    if delta.final_at_delete:
        m.final_at_delete = True
    if delta.wrapped:
        m.wrapped = True
    if delta.quarantine_reason is not None:
        m.quarantined = True
        m.quarantine_reason = delta.quarantine_reason
    return m


def measures_for(
    delta: Delta, who: Attribution, into: Any = None, templates: Templates | None = None
) -> list[pb.IPMeasure]:
    """One IPMeasure per direction that moved (bytes or packets), VM_RX first, added to `into`
    (a repeated IPMeasure field: no copy) or to a new list."""
    pair = templates.pair(delta.key, who) if templates is not None else _template_pair(delta.key, who)
    if into is None:
        into = pb.MeasureBatch().measures
    out = []
    if pair.unswapped:
        vm_rx, vm_tx = (delta.rx_bytes, delta.rx_packets), (delta.tx_bytes, delta.tx_packets)
    else:
        vm_rx, vm_tx = (delta.tx_bytes, delta.tx_packets), (delta.rx_bytes, delta.rx_packets)
    if vm_rx[0] > 0 or vm_rx[1] > 0:
        out.append(_add_measure(into, pair.rx_wire, vm_rx[0], vm_rx[1], delta))
    if vm_tx[0] > 0 or vm_tx[1] > 0:
        out.append(_add_measure(into, pair.tx_wire, vm_tx[0], vm_tx[1], delta))
    return out


def domain_inventory(
    domain: DomainInfo,
    placements: Mapping[str, LinkPlacement],
    ifindexes: Mapping[str, int],
) -> pb.DomainInventory:
    inv = pb.DomainInventory(
        uuid=domain.uuid,
        name=domain.name,
        state=STATE_ENUM.get(domain.state, pb.DOMAIN_STATE_UNKNOWN),
        kind=KIND_ENUM.get(domain.kind, pb.DOMAIN_KIND_OTHER),
    )
    if domain.account_id is not None:
        inv.account_id = domain.account_id
    if domain.vm_id is not None:
        inv.vm_id = domain.vm_id
    for k, v in sorted(domain.owner.items()):
        inv.owner[k] = v
    for nic in domain.nics:
        n = inv.nics.add(mac=nic.mac, nic_type=nic.nic_type)
        for attr in ("device", "bridge", "network", "model"):
            value = getattr(nic, attr)
            if value is not None:
                setattr(n, attr, value)
        placement = placements.get(nic.device) if nic.device else None
        if placement is not None:
            n.traffic_type = TRAFFIC_ENUM.get(placement.traffic_type, pb.TRAFFIC_UNKNOWN)
            if placement.vlan_id is not None:
                n.vlan_id = placement.vlan_id
            if placement.vxlan_vni is not None:
                n.vxlan_vni = placement.vxlan_vni
        if nic.device and nic.device in ifindexes:
            n.ifindex = ifindexes[nic.device]
    return inv


def _add_totals(totals: dict[str, list[int]] | None, traffic: str | None, vm_rx: int, vm_tx: int) -> None:
    if totals is None or traffic is None:
        return
    total = totals.setdefault(traffic, [0, 0])
    total[0] += vm_rx
    total[1] += vm_tx


def batch_header(
    *, host_id: str, boot_id: str, stream_id: str, seq: int, poll_ms: int, final: bool = False
) -> pb.MeasureBatch:
    """A MeasureBatch with its own fields and no measures or inventory yet."""
    return pb.MeasureBatch(
        schema=SCHEMA_VERSION,
        host_id=host_id,
        boot_id=boot_id,
        stream_id=stream_id,
        seq=seq,
        poll_time=poll_ms,
        final=final,
    )


def build_batch(
    *,
    host_id: str,
    boot_id: str,
    stream_id: str,
    seq: int,
    poll_ms: int,
    deltas: Iterable[Delta],
    attribution: Mapping[CounterKey, Attribution],
    inventory: Iterable[pb.DomainInventory] | None = None,
    final: bool = False,
    templates: Templates | None = None,
    totals: dict[str, list[int]] | None = None,
) -> tuple[pb.MeasureBatch, list[Delta]]:
    """The batch for one poll, and the deltas that had no attribution (not a VM NIC: ignored).
    `totals`, when given, receives the VM-side bytes per traffic type: {type: [vm_rx, vm_tx]}."""
    batch = batch_header(
        host_id=host_id, boot_id=boot_id, stream_id=stream_id, seq=seq, poll_ms=poll_ms, final=final
    )
    unattributed = add_measures(batch.measures, deltas, attribution, templates, totals)
    if inventory is not None:
        batch.inventory.extend(inventory)
    return batch, unattributed


def add_measures(
    into: Any,
    deltas: Iterable[Delta],
    attribution: Mapping[CounterKey, Attribution],
    templates: Templates | None = None,
    totals: dict[str, list[int]] | None = None,
) -> list[Delta]:
    """The deltas' measures added to `into` (a repeated IPMeasure field), in order; returns the
    deltas that had no attribution."""
    unattributed = []
    templates = templates if templates is not None else Templates()
    cached = templates.cached
    add = into.add
    # VM-side byte sums of the current run of deltas of one traffic type (usually all of them)
    traffic: str | None = None
    vm_rx_sum = vm_tx_sum = 0
    for delta in deltas:
        key, start, end, rx_bytes, tx_bytes, rx_packets, tx_packets, wrapped, final_at, reason = delta
        who = attribution.get(key)
        if who is None:
            unattributed.append(delta)
            continue
        pair = cached(key)
        if pair is None or pair[0] is not who:
            pair = templates.pair(key, who)
        _who, unswapped, pair_traffic, rx_template, tx_template, _ifindex = pair
        if unswapped:
            rx_bytes, rx_packets, tx_bytes, tx_packets = tx_bytes, tx_packets, rx_bytes, rx_packets
        if pair_traffic != traffic:
            _add_totals(totals, traffic, vm_rx_sum, vm_tx_sum)
            traffic, vm_rx_sum, vm_tx_sum = pair_traffic, 0, 0
        # host tx is what the VM received (VM_RX), host rx what it sent (VM_TX)
        vm_rx_sum += tx_bytes
        vm_tx_sum += rx_bytes
        if wrapped or final_at or reason is not None:
            measures_for(delta, who, into, templates)
            continue
        # The common measure, inlined (two per moving interface per poll): copy the counter's
        # template, set what moved and when.
        if tx_bytes > 0 or tx_packets > 0:
            m = add()
            m.MergeFromString(rx_template)
            m.bytes, m.packets, m.start, m.end = tx_bytes, tx_packets, start, end
        if rx_bytes > 0 or rx_packets > 0:
            m = add()
            m.MergeFromString(tx_template)
            m.bytes, m.packets, m.start, m.end = rx_bytes, rx_packets, start, end
    _add_totals(totals, traffic, vm_rx_sum, vm_tx_sum)
    return unattributed
