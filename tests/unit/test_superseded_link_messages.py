"""A read of the link-event socket decodes a link's RTM_NEWLINK only when no later one of the
same link supersedes it: what the link table holds and the events it gives are those of
decoding every message. The recordings come from record_links.py."""

from __future__ import annotations

import pytest

from kvmeter.agent.linkevents import AF_BRIDGE, decode_link_datagrams
from kvmeter.agent.linktable import RTM_DELLINK, RTM_NEWLINK, LinkEvent, LinkTable
from tests.unit.fakes.netlink import decode_link_datagram, dumped_table, load_messages, message_type

DUMP = load_messages("host_dump.hex")
EVENTS = load_messages("events.hex")
LINK_EVENTS = [m for m in EVENTS if message_type(m) in (RTM_NEWLINK, RTM_DELLINK) and m[16] != AF_BRIDGE]


def applied(reads: list[list[bytes]]) -> tuple[LinkTable, list[LinkEvent], int, int]:
    """The table after the reads, their events, the messages decoded and those read."""
    table, events, kept, read = dumped_table(), [], 0, 0
    for datagrams in reads:
        messages, found = decode_link_datagrams(datagrams)
        kept, read = kept + len(messages), read + found
        events += filter(None, (table.apply(msg_type, record) for msg_type, record in messages))
    return table, events, kept, read


def state(table: LinkTable) -> dict[str, object]:
    return {name: (table.record(name), table.placement(name)) for name in table.links()}


def by_link(events: list[LinkEvent]) -> dict[int, list[tuple[object, ...]]]:
    """Each link's events in order. A link's birth may come later among other links' events (at
    its last RTM_NEWLINK: the engine takes births and deletions of distinct links in any order),
    with the counters of that message: a birth's counters are not read (a link born while the
    engine accounts counts from zero), a deletion's are its final ones."""
    links: dict[int, list[tuple[object, ...]]] = {}
    for e in events:
        links.setdefault(e.ifindex, []).append((e.kind, e.ifname, e.stats if e.kind == "del" else None))
    return links


@pytest.mark.parametrize("size", [2, 3, 5, len(EVENTS)])
def test_reads_of_many_messages_leave_the_table_and_events_as_one_message_a_read(size: int) -> None:
    one_by_one, each_events, _, _ = applied([[m] for m in EVENTS])
    gathered, events, kept, read = applied([EVENTS[i : i + size] for i in range(0, len(EVENTS), size)])
    assert state(gathered) == state(one_by_one)
    # the taps' births and deletions, with their final counters
    assert by_link(events) == by_link(each_events)
    assert read == len(LINK_EVENTS)
    if size == len(EVENTS):
        assert kept < read  # the recording's taps were enslaved and set up after they were made


def test_a_deletion_keeps_the_last_newlink_before_it_and_those_after() -> None:
    (vnet9,) = [m for m in LINK_EVENTS if message_type(m) == RTM_NEWLINK and b"vnet9\0" in m][-1:]
    (gone,) = [m for m in LINK_EVENTS if message_type(m) == RTM_DELLINK and b"vnet9\0" in m]
    messages, read = decode_link_datagrams([vnet9, vnet9, gone, vnet9, vnet9])
    assert read == 5
    assert [(t, r.ifname) for t, r in messages] == [
        (RTM_NEWLINK, "vnet9"),
        (RTM_DELLINK, "vnet9"),
        (RTM_NEWLINK, "vnet9"),
    ]


def test_a_later_newlink_that_does_not_decode_supersedes_nothing() -> None:
    bridge = DUMP[2]  # cloudbr0's
    # its nlmsghdr and ifinfomsg (less the flags), and no attribute: no name
    nameless = (32).to_bytes(4, "little") + bridge[4:24] + bytes(8)
    assert decode_link_datagram(nameless) == []
    messages, read = decode_link_datagrams([bridge, nameless])
    assert [r.ifname for _, r in messages] == ["cloudbr0"]
    assert read == 2
