"""Deltas -> MeasureBatch: VM-side directions, one measure per moving direction, flags, inventory."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from kvmeter.agent.measures import Attribution, Templates, _template_pair, build_batch, domain_inventory
from kvmeter.agent.model import CounterKey, Delta, DomainInfo, LinkPlacement, NicInfo
from kvmeter.proto import SCHEMA_VERSION, pb
from tests.proto import legacy_ipmeasure_pb2 as legacy

KEY = CounterKey("boot-1", 31, "vnet3")
NIC = NicInfo(mac="02:00:4c:0f:00:01", device="vnet3", nic_type="bridge", bridge="brvx-5001", model="virtio")
MACVTAP = NicInfo(mac="02:00:4c:0f:00:02", device="macvtap0", nic_type="direct")
DOMAIN = DomainInfo(
    uuid="6d2a3c5e-0000-4000-8000-000000000010",
    name="i-2-10-VM",
    state="running",
    kind="user_vm",
    nics=(NIC,),
    account_id="2",
    vm_id="10",
    owner={"accountUuid": "acc-1"},
)
GUEST = LinkPlacement(bridge="brvx-5001", vxlan_vni=5001, traffic_type="guest")


def delta(
    key: CounterKey = KEY, rx: int = 0, tx: int = 0, rxp: int = 0, txp: int = 0, **flags: object
) -> Delta:
    return Delta(key, 1000, 2000, rx, tx, rxp, txp, **flags)  # type: ignore[arg-type]


def build(
    deltas: list[Delta],
    attribution: dict[CounterKey, Attribution],
    totals: dict[str, list[int]] | None = None,
) -> tuple[pb.MeasureBatch, list[Delta]]:
    return build_batch(
        host_id="h1",
        boot_id="boot-1",
        stream_id="st",
        seq=4,
        poll_ms=2000,
        deltas=deltas,
        attribution=attribution,
        totals=totals,
    )


def batch(deltas: list[Delta], attribution: dict[CounterKey, Attribution]) -> pb.MeasureBatch:
    return build(deltas, attribution)[0]


@pytest.mark.parametrize(
    ("nic", "host_rx", "host_tx", "vm_rx", "vm_tx"),
    [
        (NIC, 100, 7000, 7000, 100),  # a tap: host tx is what the VM received
        (MACVTAP, 100, 7000, 100, 7000),  # macvtap: not swapped
    ],
)
def test_directions_are_from_the_vm_point_of_view(
    nic: NicInfo, host_rx: int, host_tx: int, vm_rx: int, vm_tx: int
) -> None:
    b = batch([delta(rx=host_rx, tx=host_tx, rxp=1, txp=7)], {KEY: Attribution(DOMAIN, nic, GUEST)})
    by_dir = {m.direction: m for m in b.measures}
    assert by_dir[pb.VM_RX].bytes == vm_rx
    assert by_dir[pb.VM_TX].bytes == vm_tx
    assert by_dir[pb.VM_RX].packets == (7 if nic is NIC else 1)


def test_measure_carries_identity_placement_and_the_five_original_fields() -> None:
    b = batch([delta(rx=0, tx=1500, txp=1)], {KEY: Attribution(DOMAIN, NIC, GUEST)})
    (m,) = b.measures  # the direction with nothing moved is left out
    assert (m.direction, m.bytes, m.packets, m.start, m.end) == (pb.VM_RX, 1500, 1, 1000, 2000)
    assert (m.header, m.saddr) == (SCHEMA_VERSION, 0)
    assert (m.device, m.ifindex, m.mac, m.instance_uuid, m.domain_name) == (
        "vnet3",
        31,
        NIC.mac,
        DOMAIN.uuid,
        "i-2-10-VM",
    )
    assert (m.traffic_type, m.bridge, m.vxlan_vni, m.HasField("vlan_id")) == (
        pb.GUEST,
        "brvx-5001",
        5001,
        False,
    )
    old = legacy.IPMeasure.FromString(m.SerializeToString())  # a five-field consumer still parses it
    assert (old.header, old.saddr, old.bytes, old.start, old.end) == (SCHEMA_VERSION, 0, 1500, 1000, 2000)
    assert (b.host_id, b.boot_id, b.stream_id, b.seq, b.poll_time, b.schema) == (
        "h1",
        "boot-1",
        "st",
        4,
        2000,
        2,
    )


def test_packets_without_bytes_still_make_a_measure_and_nothing_makes_none() -> None:
    who = {KEY: Attribution(DOMAIN, NIC, GUEST)}
    assert [m.packets for m in batch([delta(rxp=2)], who).measures] == [2]
    assert list(batch([delta()], who).measures) == []


def test_flags_quarantine_final_and_wrap() -> None:
    d = delta(rx=10, tx=20, final_at_delete=True, wrapped=True, quarantine_reason="rx jump")
    b = batch([d], {KEY: Attribution(DOMAIN, NIC, GUEST)})
    assert len(b.measures) == 2
    for m in b.measures:
        assert (m.final_at_delete, m.wrapped, m.quarantined, m.quarantine_reason) == (
            True,
            True,
            True,
            "rx jump",
        )
    plain = batch([delta(rx=10)], {KEY: Attribution(DOMAIN, NIC, GUEST)}).measures[0]
    assert not plain.HasField("quarantined")
    assert not plain.HasField("final_at_delete")


def test_unattributed_deltas_are_returned_not_measured() -> None:
    other = CounterKey("boot-1", 2, "eth0")
    b, rest = build_batch(
        host_id="h1",
        boot_id="boot-1",
        stream_id="st",
        seq=1,
        poll_ms=2000,
        deltas=[delta(other, rx=5)],
        attribution={},
    )
    assert list(b.measures) == []
    assert [d.key for d in rest] == [other]


def test_domain_inventory() -> None:
    inv = domain_inventory(DOMAIN, {"vnet3": GUEST}, {"vnet3": 31})
    assert (inv.uuid, inv.name, inv.state, inv.kind, inv.account_id, inv.vm_id) == (
        DOMAIN.uuid,
        "i-2-10-VM",
        pb.RUNNING,
        pb.USER_VM,
        "2",
        "10",
    )
    assert dict(inv.owner) == {"accountUuid": "acc-1"}
    (n,) = inv.nics
    assert (n.mac, n.device, n.bridge, n.model, n.nic_type, n.traffic_type, n.vxlan_vni, n.ifindex) == (
        NIC.mac,
        "vnet3",
        "brvx-5001",
        "virtio",
        "bridge",
        pb.GUEST,
        5001,
        31,
    )


def test_totals_sum_vm_side_bytes_per_traffic_type_flagged_deltas_included() -> None:
    public = LinkPlacement(bridge="cloudbr0", traffic_type="public")
    k2, k3 = CounterKey("boot-1", 32, "vnet4"), CounterKey("boot-1", 33, "macvtap0")
    attribution = {
        KEY: Attribution(DOMAIN, NIC, GUEST),
        k2: Attribution(DOMAIN, NIC, public),
        k3: Attribution(DOMAIN, MACVTAP, GUEST),
    }
    deltas = [
        delta(rx=100, tx=7000, rxp=1, txp=7),  # guest tap: VM_RX 7000, VM_TX 100
        delta(k2, rx=5, tx=50, rxp=1, txp=1),  # public tap
        delta(k3, rx=300, tx=20, rxp=3, txp=1),  # guest macvtap, not swapped: VM_RX 300, VM_TX 20
        delta(rx=1, tx=2, rxp=1, txp=1, final_at_delete=True),  # flagged: counted too
        delta(CounterKey("boot-1", 99, "cloudbr0"), rx=10**6, tx=10**6),  # not a VM NIC: not counted
    ]
    totals: dict[str, list[int]] = {}
    b, unattributed = build(deltas, attribution, totals)
    assert totals == {"guest": [7000 + 300 + 2, 100 + 20 + 1], "public": [50, 5]}
    assert [d.key.name for d in unattributed] == ["cloudbr0"]
    assert sum(m.bytes for m in b.measures if m.direction == pb.VM_RX) == 7000 + 50 + 300 + 2


def filled(templates: Templates, key: CounterKey, who: Attribution, was: CounterKey | None) -> Any:
    """The pair Templates.fill gives `key` (a new incarnation of `was`, when given)."""
    pairs: list[Any] = [None]
    templates.fill(pairs, [0], [key], [who], {key.name: was} if was is not None else {})
    return pairs[0]


@pytest.mark.parametrize(
    ("old_ifindex", "new_ifindex"), [(31, 32), (31, 300), (300, 31), (127, 128), (70000, 2)]
)
def test_a_reborn_counters_templates_are_the_bytes_built_from_scratch(
    old_ifindex: int, new_ifindex: int
) -> None:
    templates = Templates()
    old_key, new_key = CounterKey("boot-1", old_ifindex, "vnet3"), CounterKey("boot-1", new_ifindex, "vnet3")
    templates.pair(old_key, Attribution(DOMAIN, NIC, GUEST))
    # the new incarnation: the same domain and NIC, an equal placement object, another ifindex
    who = Attribution(DOMAIN, NIC, LinkPlacement(bridge="brvx-5001", vxlan_vni=5001, traffic_type="guest"))
    reborn = filled(templates, new_key, who, old_key)
    assert reborn == _template_pair(new_key, who)
    assert pb.IPMeasure.FromString(reborn.rx_wire).ifindex == new_ifindex
    # the very attribution object of the last incarnation (as the agent hands it over)
    same = Templates()
    first = filled(same, old_key, who, None)
    assert filled(same, new_key, first.who, old_key) == _template_pair(new_key, who)


def test_a_reborn_counter_elsewhere_gets_templates_built_from_scratch() -> None:
    templates = Templates()
    old_key, new_key = CounterKey("boot-1", 31, "vnet3"), CounterKey("boot-1", 32, "vnet3")
    templates.pair(old_key, Attribution(DOMAIN, NIC, GUEST))
    moved = LinkPlacement(bridge="brvx-5002", vxlan_vni=5002, traffic_type="guest")
    for who in (
        Attribution(DOMAIN, NIC, moved),
        Attribution(DOMAIN, MACVTAP, GUEST),
        Attribution(dataclasses.replace(DOMAIN, name="i-2-11-VM"), NIC, GUEST),
    ):
        pair = filled(templates, new_key, who, old_key)
        assert pair == _template_pair(new_key, who)
        assert pair.who is who


def test_a_storms_templates_filled_at_once_are_each_the_bytes_built_from_scratch() -> None:
    # many counters in one fill (a storm's): reborn for their own attribution object, reborn
    # for another, new, and one whose old pair was not built from its own bytes
    templates = Templates()
    whos = [Attribution(DOMAIN, NIC, GUEST), Attribution(DOMAIN, MACVTAP, GUEST)]
    sizes = [(31, 32), (31, 300), (300, 31), (127, 128), (70000, 2), (16383, 16384), (5, 2**21)]
    keys, was, who_of = [], {}, []
    for n, (old_ifindex, new_ifindex) in enumerate(sizes * 3):
        name = f"vnet{n}"
        old_key, key = CounterKey("boot-1", old_ifindex, name), CounterKey("boot-1", new_ifindex, name)
        first = templates.pair(old_key, whos[n % 2])
        kind = n % 3
        if kind == 0:  # the very object the last incarnation had
            who = first.who
        elif kind == 1:  # an equal placement in a new object
            equal = LinkPlacement(bridge="brvx-5001", vxlan_vni=5001, traffic_type="guest")
            assert equal == GUEST
            assert equal is not GUEST
            who = Attribution(DOMAIN, first.who.nic, equal)
        else:  # never seen: no last incarnation
            who = whos[n % 2]
            old_key = None
        if old_key is not None:
            was[name] = old_key
        keys.append(key)
        who_of.append(who)
    templates.pair(CounterKey("boot-1", 9, "vnet99"), whos[0])
    templates._cache[CounterKey("boot-1", 9, "vnet99")] = templates._cache[
        CounterKey("boot-1", 9, "vnet99")
    ]._replace(
        rx_wire=b"\x0a\x00"  # an old pair whose bytes do not end with its ifindex field
    )
    keys.append(CounterKey("boot-1", 10, "vnet99"))
    who_of.append(templates._cache[CounterKey("boot-1", 9, "vnet99")].who)
    was["vnet99"] = CounterKey("boot-1", 9, "vnet99")
    pairs: list[Any] = [None] * len(keys)
    templates.fill(pairs, range(len(keys)), keys, who_of, was)
    for key, who, pair in zip(keys, who_of, pairs, strict=True):
        assert pair == _template_pair(key, who), key
        assert pair.who is who
        assert templates.cached(key) is pair
