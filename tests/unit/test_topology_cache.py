"""The link table's placements stay right when it keeps them across link changes: after any
sequence of links coming, going and moving, every link's placement equals the one a table built
from scratch over the same links computes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmeter.agent.topology import RTM_DELLINK, RTM_NEWLINK, LinkRecord, LinkTable
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
