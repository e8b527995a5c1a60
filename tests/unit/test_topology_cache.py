"""The link table's placements stay right when it keeps them across link changes: after any
sequence of links coming, going and moving, every link's placement equals the one a table built
from scratch over the same links computes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmeter.agent.linktable import RTM_DELLINK, RTM_NEWLINK, LinkRecord, LinkTable
from kvmeter.agent.traffic import TrafficRules

RULES = TrafficRules.from_config(
    {"rules": [{"vlan": "100-199", "type": "public"}, {"vni": "5000-5999", "type": "guest"}]}
)
INDEXES = range(1, 13)
KINDS = [None, "tun", "tun", "tun", "bridge", "vlan", "vxlan", "macvtap", "veth"]

record = st.builds(
    lambda index, kind, master, link, number, name: LinkRecord(
        ifindex=index,
        ifname=name or f"if{index}",
        kind=kind,
        master=master,
        link=link,
        vlan_id=number if kind == "vlan" else None,
        vxlan_vni=5000 + number if kind == "vxlan" else None,
    ),
    st.sampled_from(INDEXES),
    st.sampled_from(KINDS),
    st.none() | st.sampled_from(INDEXES),
    st.none() | st.sampled_from(INDEXES),
    st.integers(90, 110),
    st.none() | st.sampled_from(["br-a", "br-b", "renamed"]),
)
change = st.tuples(st.sampled_from([RTM_NEWLINK, RTM_NEWLINK, RTM_DELLINK]), record)


@settings(max_examples=400, deadline=None)
@given(st.lists(record, max_size=8), st.lists(change, min_size=1, max_size=25))
def test_kept_placements_equal_fresh_ones(
    start: list[LinkRecord], changes: list[tuple[int, LinkRecord]]
) -> None:
    table = LinkTable(RULES)
    table.replace_all(start)
    for msg_type, rec in changes:
        for name in [f"if{i}" for i in INDEXES] + ["br-a", "br-b", "renamed"]:
            table.placement(name)  # fill the cache before every change
        table.apply(msg_type, rec)
        fresh = LinkTable(RULES)
        fresh.replace_all(table._links.values())
        for name in table.links():
            assert table.placement(name) == fresh.placement(name), (name, msg_type, rec)


def test_a_veth_coming_or_going_keeps_the_other_links_placements() -> None:
    """A veth's IFLA_LINK is its peer, often in another namespace, where the index may be any
    link's here: it is no reason to drop the placements others computed (a VM storm on a host
    of thousands would otherwise recompute them all at every tap)."""
    table = LinkTable(RULES)
    table.replace_all(
        [
            LinkRecord(ifindex=1, ifname="brvx-5001", kind="bridge"),
            LinkRecord(ifindex=2, ifname="vxlan5001", kind="vxlan", master=1, vxlan_vni=5001),
            *(
                LinkRecord(ifindex=i, ifname=f"vnet{i}", kind="veth", master=1, link=i + 1)
                for i in range(10, 20)
            ),
        ]
    )
    before = {f"vnet{i}": table.placement(f"vnet{i}") for i in range(10, 20)}
    # a new tap whose peer's index (12, in the VMs' namespace) is vnet12's index here
    table.apply(RTM_NEWLINK, LinkRecord(ifindex=30, ifname="vnet30", kind="veth", master=1, link=12))
    table.apply(RTM_DELLINK, LinkRecord(ifindex=15, ifname="vnet15", kind="veth", master=1, link=16))
    for name, placement in before.items():
        if name != "vnet15":
            assert table._placements.get(name) is placement  # kept, not recomputed
    assert table.placement("vnet30").vxlan_vni == 5001
    # a macvtap's parent is a dependency: the uplink moving drops what read it
    table.apply(RTM_NEWLINK, LinkRecord(ifindex=40, ifname="macvtap0", kind="macvtap", link=2))
    assert table.placement("macvtap0").uplink == "vxlan5001"
    table.apply(RTM_DELLINK, LinkRecord(ifindex=2, ifname="vxlan5001", kind="vxlan", master=1))
    assert table.placement("macvtap0").uplink is None
