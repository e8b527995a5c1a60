"""Topology from recorded netlink messages: placements (VLAN uplinks included), link events,
AF_BRIDGE noise, overruns and re-dumps. The recordings come from record_links.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from itertools import pairwise

import pytest

from kvmeter.agent.linkevents import Received, decode_link_datagrams, parse_link_message
from kvmeter.agent.linktable import RTM_DELLINK, RTM_NEWLINK, LinkEvent, LinkRecord, LinkTable
from kvmeter.agent.model import LinkPlacement
from kvmeter.agent.topology import GATHER_BELOW, Topology
from kvmeter.agent.traffic import DEFAULT_RULES, TrafficRules
from tests.unit.fakes.netlink import (
    FakeEventSocket,
    FakeIPRoute,
    decode_link_datagram,
    decoded,
    dumped_table,
    load_messages,
    message_type,
)

DUMP = load_messages("host_dump.hex")
EVENTS = load_messages("events.hex")
VLAN_PUBLIC = TrafficRules.from_config({"rules": [{"vlan": "100", "type": "public"}]})


def test_vlan_message_decodes_with_pyroute2() -> None:
    vlan = [parse_link_message(decoded(m)) for m in DUMP if b"eth1.100" in m]
    assert vlan == [
        LinkRecord(
            ifindex=1000, ifname="eth1.100", kind="vlan", master=5, link=8, vlan_id=100, stats=(0, 0, 0, 0)
        )
    ]


def test_vxlan_message_decodes_with_pyroute2() -> None:
    vxlan = [parse_link_message(decoded(m)) for m in DUMP if b"vxlan1001\0" in m]
    assert vxlan[0].kind == "vxlan"
    assert vxlan[0].vxlan_vni == 1001
    assert vxlan[0].master == 4  # brvx-1001


PLACEMENTS = [
    # ifname, rules, expected
    ("vnet0", DEFAULT_RULES, LinkPlacement("brvx-1001", None, 1001, "guest", uplink="vxlan1001")),
    ("vnet1", DEFAULT_RULES, LinkPlacement("cloudbr0", traffic_type="public")),
    ("vnet2", DEFAULT_RULES, LinkPlacement("cloud0", traffic_type="control")),
    ("vnet3", DEFAULT_RULES, LinkPlacement("breth1-100", 100, None, "guest", uplink="eth1.100")),
    ("vnet3", VLAN_PUBLIC, LinkPlacement("breth1-100", 100, None, "public", uplink="eth1.100")),
    # a macvtap is the guest's end: counted as the guest counts (guest_side, never swapped)
    ("macvtap0", DEFAULT_RULES, LinkPlacement(None, 100, None, "unknown", "eth1.100", guest_side=True)),
    ("macvtap0", VLAN_PUBLIC, LinkPlacement(None, 100, None, "public", "eth1.100", guest_side=True)),
    ("eth1", DEFAULT_RULES, LinkPlacement(None)),
    ("vnet0-vm", DEFAULT_RULES, LinkPlacement(None)),  # veth peer link is not an uplink
    ("cloudbr0", DEFAULT_RULES, LinkPlacement(None)),  # a bridge is not on a bridge
    ("no-such-link", DEFAULT_RULES, LinkPlacement(None)),
]


@pytest.mark.parametrize(("ifname", "rules", "expected"), PLACEMENTS)
def test_placement_from_recorded_dump(ifname: str, rules: TrafficRules, expected: LinkPlacement) -> None:
    assert dumped_table(rules).placement(ifname) == expected


def test_dump_names_and_indexes() -> None:
    table = dumped_table()
    links = table.links()
    assert links["vnet0"] == 10
    assert links["eth1.100"] == 1000
    assert table.ifindex("cloudbr0") == 3
    assert table.ifindex("nope") is None
    assert len(table) == len(DUMP)


def test_recorded_events_become_new_and_del_with_final_counters() -> None:
    table = dumped_table()
    events = []
    for message in EVENTS:
        for msg_type, record in decode_link_datagram(message):
            event = table.apply(msg_type, record)
            if event is not None:
                events.append(event)
    # 7 frames of 100 bytes went from vnet9-vm into vnet9. Every AF_BRIDGE port message
    # (including an RTM_DELLINK meaning "left the bridge") is ignored.
    assert events == [
        LinkEvent("new", "vnet9-vm", 17, (0, 0, 0, 0)),
        LinkEvent("new", "vnet9", 18, (0, 0, 0, 0)),
        # a veth's rx is read from its peer, and veth unlinks the peers before the kernel
        # builds the RTM_DELLINK messages: vnet9's final message has no rx. Taps (what KVM
        # uses) count their own; see the netns integration test.
        # (each with where it sat until then)
        LinkEvent("del", "vnet9", 18, (0, 0, 0, 0), left=LinkPlacement("cloudbr0", traffic_type="public")),
        LinkEvent("del", "vnet9-vm", 17, (0, 0, 700, 7), left=LinkPlacement(None)),
    ]
    assert table.ifindex("vnet9") is None


def test_placement_follows_master_changes() -> None:
    table = dumped_table()
    placements = []
    for message in EVENTS:
        for msg_type, record in decode_link_datagram(message):
            table.apply(msg_type, record)
            if record.ifname == "vnet9" and msg_type == RTM_NEWLINK:
                placements.append(table.placement("vnet9").bridge)
    assert placements[0] is None
    assert placements[-1] == "cloudbr0"
    assert table.placement("vnet9") == LinkPlacement(None)  # deleted


def test_af_bridge_messages_are_skipped() -> None:
    bridge_family = [m for m in EVENTS if m[16] == 7]
    assert bridge_family, "the recording has AF_BRIDGE messages"
    assert any(message_type(m) == RTM_DELLINK for m in bridge_family)
    for message in bridge_family:
        assert decode_link_datagram(message) == []


def test_one_datagram_with_many_messages_keeps_order() -> None:
    decoded_all = decode_link_datagram(b"".join(DUMP))
    assert [r.ifname for _, r in decoded_all][:3] == ["lo", "cloud0", "cloudbr0"]
    assert len(decoded_all) == len(DUMP)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00" * 8,
        DUMP[1][:-8],  # truncated: length says more than there is
        (8).to_bytes(4, "little") + DUMP[1][4:],  # length below the header size
    ],
)
def test_truncated_or_short_datagrams_yield_nothing(data: bytes) -> None:
    assert decode_link_datagram(data) == []


def test_undecodable_message_is_skipped_and_the_rest_kept() -> None:
    good = DUMP[2]
    # a link message whose ifinfomsg is cut short (16-byte header + 4 bytes)
    bad = (20).to_bytes(4, "little") + RTM_NEWLINK.to_bytes(2, "little") + bytes(14)
    records = decode_link_datagram(bad + good)
    assert [r.ifname for _, r in records] == ["cloudbr0"]


def test_other_message_types_are_ignored() -> None:
    done = (20).to_bytes(4, "little") + (3).to_bytes(2, "little") + bytes(14)
    assert [r.ifname for _, r in decode_link_datagram(done + DUMP[3])] == ["brvx-1001"]


def test_newlink_for_known_link_with_same_place_is_no_event() -> None:
    table = dumped_table()
    record = table.record("vnet1")
    assert record is not None
    assert table.apply(RTM_NEWLINK, record) is None


def test_rename_is_the_same_link_under_the_new_name() -> None:
    table = dumped_table()
    record = table.record("vnet1")
    assert record is not None
    renamed = LinkRecord(record.ifindex, "tap-renamed", record.kind, record.master)
    assert table.apply(RTM_NEWLINK, renamed) == LinkEvent(
        "rename", "tap-renamed", record.ifindex, None, "vnet1"
    )
    assert table.ifindex("vnet1") is None
    assert table.placement("tap-renamed").bridge == "cloudbr0"


def test_dellink_of_unknown_link_is_still_reported() -> None:
    table = LinkTable(DEFAULT_RULES)
    event = table.apply(RTM_DELLINK, LinkRecord(42, "vnet42", stats=(1, 2, 3, 4)))
    assert event == LinkEvent("del", "vnet42", 42, (1, 2, 3, 4))


def test_replace_all_reports_differences() -> None:
    table = LinkTable(DEFAULT_RULES)
    assert table.replace_all([LinkRecord(1, "a"), LinkRecord(2, "b"), LinkRecord(3, "c")]) == [
        LinkEvent("new", "a", 1),
        LinkEvent("new", "b", 2),
        LinkEvent("new", "c", 3),
    ]
    events = table.replace_all(
        [LinkRecord(1, "a"), LinkRecord(3, "c2", stats=(5, 1, 0, 0)), LinkRecord(4, "d")]
    )
    assert events == [
        LinkEvent("del", "b", 2),
        LinkEvent("rename", "c2", 3, (5, 1, 0, 0), was="c"),  # the same ifindex: the same link
        LinkEvent("new", "d", 4),
    ]
    assert table.links() == {"a": 1, "c2": 3, "d": 4}


def test_several_uplinks_pick_lowest_ifindex() -> None:
    table = LinkTable(DEFAULT_RULES)
    table.replace_all(
        [
            LinkRecord(1, "brX", "bridge"),
            LinkRecord(9, "vxlan9", "vxlan", master=1, vxlan_vni=9),
            LinkRecord(5, "eth0.7", "vlan", master=1, vlan_id=7),
            LinkRecord(6, "vnet0", "tun", master=1),
        ]
    )
    assert table.placement("vnet0") == LinkPlacement("brX", 7, None, "unknown", uplink="eth0.7")


# -- the adapter, with fakes in place of the kernel ------------------------------------------


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


class Recorder:
    def __init__(self) -> None:
        self.events: list[LinkEvent] = []
        self.lock = threading.Lock()

    def __call__(self, event: LinkEvent) -> None:
        with self.lock:
            self.events.append(event)


def started(dump: list[bytes], sock: FakeEventSocket) -> Topology:
    """The agent's topology as it runs (its event thread waits without a timeout)."""
    topology = Topology(
        DEFAULT_RULES, ipr_factory=lambda: FakeIPRoute(dump), event_socket_factory=lambda: sock
    )
    topology.start()
    return topology


class CountingEventSocket(FakeEventSocket):
    def __init__(self) -> None:
        super().__init__()
        self.receives = 0

    def receive(self, known: Callable[[int], LinkRecord | None] | None = None) -> Received:
        self.receives += 1
        return super().receive(known)


def test_the_event_thread_wakes_only_for_events_and_stop() -> None:
    """An idle wakeup costs CPU on every hypervisor: between events the thread waits in one
    read, which stop() ends."""
    sock = CountingEventSocket()
    topology = started(DUMP, sock)
    recorder = Recorder()
    topology.add_listener(recorder)
    try:
        time.sleep(0.3)
        assert sock.receives == 1
        sock.push(*EVENTS)
        wait_for(lambda: len(recorder.events) == 4)
        time.sleep(0.3)
        assert sock.receives == 2  # the events' read, then one wait again
    finally:
        topology.stop()
    assert sock.receives == 2  # stop() ended that wait (and joined the thread)
    assert sock.closed


def test_topology_start_dumps_once_and_follows_events() -> None:
    sock = FakeEventSocket()
    topology = started(DUMP, sock)
    recorder = Recorder()
    topology.add_listener(recorder)
    try:
        assert topology.dumps == 1
        assert topology.placement("vnet0").traffic_type == "guest"
        assert topology.links()["vnet3"] == 16
        assert recorder.events == []  # the first dump reports nothing
        sock.push(*EVENTS)
        wait_for(lambda: len(recorder.events) == 4)
        assert [e.kind for e in recorder.events] == ["new", "new", "del", "del"]
        assert recorder.events[3].stats == (0, 0, 700, 7)
        assert topology.dumps == 1  # events never re-dump
        assert topology.ifindex("vnet9") is None
    finally:
        topology.stop()
    assert sock.closed


def test_overrun_applies_what_was_read_then_redumps_and_reports_what_changed_unseen() -> None:
    sock = FakeEventSocket()
    vm_end_new = EVENTS[0]  # RTM_NEWLINK vnet9-vm
    vm_end_del = next(m for m in EVENTS if message_type(m) == RTM_DELLINK and b"vnet9-vm" in m)
    dump = [*DUMP, vm_end_new]
    topology = started(dump, sock)
    recorder = Recorder()
    topology.add_listener(recorder)
    try:
        assert topology.ifindex("vnet9-vm") == 17
        # while events were being dropped, vnet1 vanished unseen; vnet9-vm's deletion was read
        dump[:] = [m for m in DUMP if b"vnet1\0" not in m]
        sock.overrun(vm_end_del)
        wait_for(lambda: topology.dumps == 2)
        wait_for(lambda: len(recorder.events) == 2)
        assert topology.overruns == 1
        assert recorder.events == [
            LinkEvent("del", "vnet9-vm", 17, (0, 0, 700, 7), left=LinkPlacement(None)),  # final counters kept
            LinkEvent("del", "vnet1", 12, None),  # tail unknown: gone while events were lost
        ]
        assert topology.ifindex("vnet1") is None
    finally:
        topology.stop()


def test_failed_redump_is_retried() -> None:
    sock = FakeEventSocket()
    calls = []

    def flaky() -> FakeIPRoute:
        calls.append(1)
        if len(calls) == 2:
            raise OSError("netlink busy")
        return FakeIPRoute(DUMP)

    topology = Topology(DEFAULT_RULES, ipr_factory=flaky, event_socket_factory=lambda: sock)
    topology.start()
    try:
        sock.overrun()
        wait_for(lambda: topology.dumps == 2, timeout=5)
        assert len(calls) == 3
    finally:
        topology.stop()


def test_a_failing_listener_does_not_stop_the_others() -> None:
    sock = FakeEventSocket()
    topology = started(DUMP, sock)
    recorder = Recorder()

    def broken(event: LinkEvent) -> None:
        raise RuntimeError("listener bug")

    topology.add_listener(broken)
    topology.add_listener(recorder)
    try:
        sock.push(*EVENTS)
        wait_for(lambda: len(recorder.events) == 4)
        sock.push(*EVENTS[:2])  # the thread is still alive
        wait_for(lambda: len(recorder.events) == 6)
    finally:
        topology.stop()


def test_start_twice_is_an_error_and_stop_is_idempotent() -> None:
    topology = started(DUMP, FakeEventSocket())
    with pytest.raises(RuntimeError):
        topology.start()
    topology.stop()
    topology.stop()


def test_failed_first_dump_closes_the_socket() -> None:
    sock = FakeEventSocket()

    def broken_ipr() -> FakeIPRoute:
        raise OSError("netlink unavailable")

    topology = Topology(DEFAULT_RULES, ipr_factory=broken_ipr, event_socket_factory=lambda: sock)
    with pytest.raises(OSError, match="netlink unavailable"):
        topology.start()
    assert sock.closed


class TimedEventSocket(FakeEventSocket):
    """Notes when each read that found a datagram returned."""

    def __init__(self) -> None:
        super().__init__()
        self.read_at: list[float] = []

    def receive(self, known: Callable[[int], LinkRecord | None] | None = None) -> Received:
        received = super().receive(known)
        if received.messages:
            self.read_at.append(time.monotonic())
        return received


def gathering(sock: TimedEventSocket, gather: float) -> Topology:
    return Topology(
        DEFAULT_RULES, ipr_factory=lambda: FakeIPRoute(DUMP), event_socket_factory=lambda: sock, gather=gather
    )


def test_after_a_read_that_found_messages_the_thread_gathers_the_rest_of_the_burst() -> None:
    sock = TimedEventSocket()
    topology = gathering(sock, 0.3)
    topology.start()
    try:
        pushed = time.monotonic()
        for message in EVENTS[:5]:  # one datagram each (the fake hands out one per read), each a link
            sock.push(message)
        wait_for(lambda: len(sock.read_at) == 5, timeout=30)
    finally:
        topology.stop()
    assert sock.read_at[0] - pushed < 0.25  # the first message of a burst: read at once
    # each later read waited for the burst to gather, rather than woke for every message
    assert all(b - a >= 0.3 for a, b in pairwise(sock.read_at))


def test_a_read_that_found_a_burst_too_big_to_gather_reads_on_at_once() -> None:
    """A burst that fills the queue faster than a gather drains it is read on without a wait: an
    overrun would lose deletions' final counters."""
    sock = TimedEventSocket()
    topology = gathering(sock, 5.0)
    big = b"".join([EVENTS[0]] * GATHER_BELOW)  # one datagram of that many link messages
    assert decode_link_datagrams([big])[1] == GATHER_BELOW  # (all read, one decoded: the last)
    topology.start()
    try:
        for datagram in (big, big, EVENTS[0], EVENTS[1]):  # one read each
            sock.push(datagram)
        wait_for(lambda: len(sock.read_at) >= 3, timeout=4)  # not 5 s apart
        time.sleep(0.3)
        assert len(sock.read_at) == 3  # the read of one message waits the gather
    finally:
        topology.stop()
