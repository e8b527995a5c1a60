"""The inventory records the agent keeps between batches (inventory_records.InventoryRecords: a record per
domain, kept while its domain, placements and ifindexes stay the same) are byte for byte what
protobuf serialises for the same domains, placements and ifindexes, after any sequence of
changes, whether the caller names the domains it touched (the poll plan's update does) or not
(decoded alike; byte for byte where protobuf's own bytes are stable: owner maps of one entry)."""

from __future__ import annotations

from operator import is_
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmeter.agent.inventory_records import InventoryRecords
from kvmeter.agent.measures import domain_inventory
from kvmeter.agent.model import DomainInfo, LinkPlacement, NicInfo
from kvmeter.proto import pb

DEVICES = [f"vnet{i}" for i in range(6)]

nic = st.builds(
    NicInfo,
    mac=st.sampled_from(["52:54:00:00:00:01", "52:54:00:00:00:02", "fe:54:00:00:00:03"]),
    device=st.none() | st.sampled_from(DEVICES),
    nic_type=st.sampled_from(["bridge", "network", "direct", "vhostuser"]),
    bridge=st.none() | st.sampled_from(["cloudbr0", "brvx-5001"]),
    network=st.none() | st.just("default"),
    model=st.none() | st.just("virtio"),
)
domain = st.builds(
    DomainInfo,
    uuid=st.sampled_from([f"uuid-{i}" for i in range(4)]),
    name=st.sampled_from(["i-2-10-VM", "r-5-VM", "s-1-VM"]),
    state=st.sampled_from(["running", "paused", "shutoff", "gone", "odd"]),
    kind=st.sampled_from(["user_vm", "virtual_router", "system_vm", "other"]),
    nics=st.lists(nic, max_size=3).map(tuple),
    account_id=st.none() | st.just("2"),
    vm_id=st.none() | st.just("10"),
    owner=st.dictionaries(
        st.sampled_from(["zone", "account", "é"]), st.sampled_from(["z1", "ü", ""]), max_size=3
    ),
)
placement = st.builds(
    LinkPlacement,
    bridge=st.none() | st.sampled_from(["cloudbr0", "brvx-5001"]),
    vlan_id=st.none() | st.integers(0, 4094),
    vxlan_vni=st.none() | st.integers(0, 1 << 24),
    traffic_type=st.sampled_from(["guest", "public", "unknown", "storage"]),
)
# one step: which domains of the pool are there (the same objects from step to step, as the
# inventory hands them out), the placements and the ifindexes
step = st.tuples(
    st.lists(st.integers(0, 5), max_size=4),
    st.dictionaries(st.sampled_from(DEVICES), placement),
    st.dictionaries(st.sampled_from(DEVICES), st.integers(0, 1 << 31)),
)

# a step that keeps the placements and gives two-byte ifindexes: taps made again whose new
# ifindex is written over the old one in place
SAME_PLACEMENTS = {d: LinkPlacement(bridge="cloudbr0", traffic_type="guest") for d in DEVICES}
in_place = st.tuples(
    st.lists(st.integers(0, 5), max_size=4),
    st.just(SAME_PLACEMENTS),
    st.dictionaries(st.sampled_from(DEVICES), st.integers(200, 300)),
)


def encoded(records: InventoryRecords, *update: Any, touched: set[str] | None = None) -> bytes:
    """`update`, then every record."""
    records.update(*update, touched=touched)
    return records.joined()


def where(d: DomainInfo, placements: dict, ifindexes: dict) -> tuple[object, ...]:
    devices = [n.device for n in d.nics if n.device]
    return (d, *map(placements.get, devices), *map(ifindexes.get, devices))


@settings(max_examples=300, deadline=None)
@given(st.lists(domain, min_size=6, max_size=6), st.lists(step, min_size=1, max_size=6), st.booleans())
def test_kept_records_are_protobufs_own_bytes(
    pool: list[DomainInfo], steps: list, name_touched: bool
) -> None:
    records = InventoryRecords()
    last: dict[str, tuple[object, ...]] | None = None
    last_domains: list[DomainInfo] = []
    last_bytes, last_version = b"", records.version  # no records yet
    for chosen, placements, ifindexes in steps:
        domains = list({pool[i].uuid: pool[i] for i in chosen}.values())
        now = {d.uuid: where(d, placements, ifindexes) for d in domains}
        touched = None
        if name_touched and last is not None:
            # every domain whose object, placements or ifindexes differ from the last call's
            touched = {u for u in now.keys() | last.keys() if now.get(u) != last.get(u)}
        got = encoded(records, domains, placements, ifindexes, touched=touched)
        expected = pb.MeasureBatch(
            inventory=[domain_inventory(d, placements, ifindexes) for d in domains]
        ).SerializeToString()
        assert pb.MeasureBatch.FromString(got) == pb.MeasureBatch.FromString(expected)
        if all(len(d.owner) <= 1 for d in domains):
            # protobuf's own bytes are stable only then: it writes a map's entries in an order
            # that may differ between two messages holding the same map
            assert got == expected
        # the version moves whenever the bytes do, and stands still while nothing changed
        if got != last_bytes:
            assert records.version != last_version
        if now == last and len(domains) == len(last_domains) and all(map(is_, domains, last_domains)):
            assert records.version == last_version
        last, last_domains, last_bytes, last_version = now, domains, got, records.version


@settings(max_examples=300, deadline=None)
@given(
    st.lists(domain, min_size=6, max_size=6), st.lists(step | in_place, min_size=1, max_size=6), st.booleans()
)
def test_the_records_since_a_version_are_those_of_the_domains_changed_after_it(
    pool: list[DomainInfo], steps: list, name_touched: bool
) -> None:
    """`since(v)` for every version v an earlier step left: exactly the records of the domains
    there now whose object, placements or ifindexes changed in a later step (or that are new
    since), each once, in the order of their uuids, byte for byte as `joined` has them."""
    records = InventoryRecords()
    versions: list[int] = []  # the version each step left
    written: dict[str, int] = {}  # uuid -> the last step that wrote its record
    last: dict[str, tuple[object, ...]] | None = None
    for i, (chosen, placements, ifindexes) in enumerate(steps):
        domains = list({pool[c].uuid: pool[c] for c in chosen}.values())
        # compared by identity: a domain object replaced by an equal one is written again
        now = {d.uuid: (id(d), *where(d, placements, ifindexes)[1:]) for d in domains}
        touched = None
        if name_touched and last is not None:
            touched = {u for u in now.keys() | last.keys() if now.get(u) != last.get(u)}
        records.update(domains, placements, ifindexes, touched=touched)
        for u in now:
            if last is None or now[u] != last.get(u):
                written[u] = i
        whole = pb.MeasureBatch.FromString(records.joined()).inventory
        for k, version in enumerate(versions):
            expected = [dom for d, dom in zip(domains, whole, strict=True) if written[d.uuid] > k]
            got = pb.MeasureBatch.FromString(records.since(version)).inventory
            assert list(got) == sorted(expected, key=lambda dom: dom.uuid)
        assert records.since(records.version) == b""
        last = now
        versions.append(records.version)


def test_a_tap_replaced_changes_only_its_ifindex_in_the_record() -> None:
    nics = (NicInfo(mac="52:54:00:00:00:01", device="vnet1", nic_type="bridge"),)
    vm = DomainInfo(uuid="u", name="i-2-1-VM", state="running", kind="user_vm", nics=nics, owner={"a": "b"})
    where = {"vnet1": LinkPlacement(bridge="brvx-5001", vxlan_vni=5001, traffic_type="guest")}
    records = InventoryRecords()
    before = encoded(records, [vm], where, {"vnet1": 10})
    after = encoded(records, [vm], where, {"vnet1": 300}, touched={"u"})
    assert pb.MeasureBatch.FromString(after).inventory[0].nics[0].ifindex == 300
    assert (
        after == pb.MeasureBatch(inventory=[domain_inventory(vm, where, {"vnet1": 300})]).SerializeToString()
    )
    assert len(after) == len(before) + 1  # 300 takes one varint byte more than 10


def test_the_version_moves_when_only_the_order_of_the_domains_does() -> None:
    a, b = (DomainInfo(uuid=u, name="i-2-1-VM", state="running", kind="user_vm", nics=()) for u in ("a", "b"))
    records = InventoryRecords()
    first = encoded(records, [a, b], {}, {})
    version = records.version
    assert encoded(records, [a, b], {}, {}, touched=set()) == first
    assert records.version == version
    assert encoded(records, [b, a], {}, {}, touched=set()) != first
    assert records.version == version + 1


@pytest.mark.parametrize("name_touched", [False, True])
def test_the_records_since_a_version_outlive_the_trimming_of_what_was_written(name_touched: bool) -> None:
    """The log of writes `since` reads is cut to each record's last write once it is twice their
    number: what it answers for any version stays the same."""
    nics = (NicInfo(mac="52:54:00:00:00:01", device="vnet1", nic_type="bridge"),)
    a, b, c = (
        DomainInfo(uuid=u, name=f"i-2-{i}-VM", state="running", kind="user_vm", nics=nics if u == "a" else ())
        for i, u in enumerate("abc")
    )
    records = InventoryRecords()
    records.update([a, b], {}, {"vnet1": 10})
    first = records.version

    def since(version: int) -> list[str]:
        return sorted(d.uuid for d in pb.MeasureBatch.FromString(records.since(version)).inventory)

    for step in range(600):  # a's tap made again, step after step; c comes at step 300
        before = records.version
        domains = [a, b, c] if step >= 300 else [a, b]
        records.update(domains, {}, {"vnet1": 11 + step}, touched={"a", "c"} if name_touched else None)
        assert since(before) == (["a", "c"] if step == 300 else ["a"])
        assert pb.MeasureBatch.FromString(records.since(before)).inventory[0].nics[0].ifindex == 11 + step
    assert len(records._written) < 300  # the log was cut
    assert since(first) == ["a", "c"]
    assert since(0) == ["a", "b", "c"]
