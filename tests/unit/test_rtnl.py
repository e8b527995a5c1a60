"""The agent's own link-message decoder against pyroute2's, on recorded kernel messages."""

from __future__ import annotations

import pytest

from kvmeter.agent.linkevents import AF_BRIDGE, parse_link_message
from kvmeter.agent.linktable import RTM_DELLINK, RTM_NEWLINK
from kvmeter.agent.rtnl import LinkMessageError, decode_link_message
from tests.unit.fakes.netlink import decode_link_datagram, decoded, load_messages, message_type

RECORDED = [
    m
    for m in load_messages("host_dump.hex") + load_messages("events.hex")
    if message_type(m) in (RTM_NEWLINK, RTM_DELLINK)
]


def test_the_recordings_cover_vlan_vxlan_bridge_ports_and_final_counters() -> None:
    records = [parse_link_message(decoded(m)) for m in RECORDED]
    assert any(r.vlan_id for r in records)
    assert any(r.vxlan_vni for r in records)
    assert any(r.master for r in records)
    assert any(r.link for r in records)
    assert any(r.stats and any(r.stats) for r in records)


@pytest.mark.parametrize("index", range(len(RECORDED)))
def test_every_recorded_message_decodes_as_pyroute2_decodes_it(index: int) -> None:
    message = RECORDED[index]
    ours, theirs = decode_link_message(message), decoded(message)
    assert (ours["family"], ours["index"]) == (theirs["family"], theirs["index"])
    assert parse_link_message(ours) == parse_link_message(theirs)
    # a link event's path: the record straight from the message's fields
    if theirs["family"] != AF_BRIDGE and theirs.get_attr("IFLA_IFNAME"):
        assert decode_link_datagram(message) == [(message_type(message), parse_link_message(theirs))]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        RECORDED[0][:20],  # the ifinfomsg cut short
        RECORDED[0][:16] + bytes(16) + (200).to_bytes(2, "little") + (3).to_bytes(2, "little"),
        # an attribute the decoder does not take (IFLA_MTU) overrunning: an error all the same
        RECORDED[0][:16] + bytes(16) + (200).to_bytes(2, "little") + (4).to_bytes(2, "little"),
        RECORDED[0][:16] + bytes(16) + (2).to_bytes(2, "little") + (4).to_bytes(2, "little") + bytes(4),
    ],
)
def test_short_messages_and_overrunning_attributes_are_errors(data: bytes) -> None:
    if len(data) >= 4:
        data = len(data).to_bytes(4, "little") + data[4:]
    with pytest.raises(LinkMessageError):
        decode_link_message(data)
