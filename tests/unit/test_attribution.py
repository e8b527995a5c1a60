"""Attribution: instance -> owner hint -> operator map -> MAC -> IP, never a guess."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmeter.collector.attribution import CLOCK_SKEW_MS, OwnerIndex, is_router, running_near, running_since
from kvmeter.collector.lifecycle import build_history
from kvmeter.collector.model import Measure, OwnerChange, ResourceHistory, Segment
from kvmeter.proto import pb
from tests.unit.cs_events import ADMIN, T0, A, B, H, finish, usage

VM = "vm-1"
OTHER_VM = "vm-2"
PUB = "ip-1"
PUB_ADDR = "203.0.113.5"


def measure(hours: float = 1, **fields: object) -> Measure:
    base = Measure(
        stream_id="s", seq=1, index=0, host_id="h",
        start_ms=T0 + int(hours * H), end_ms=T0 + int(hours * H) + 10,
        direction="sent", bytes=100, packets=1, traffic_type="public", instance_uuid="", mac="", address="",
        domain_name="", device="vnet0",
    )  # fmt: skip
    return dataclasses.replace(base, **fields)  # type: ignore[arg-type]


def job(uuid: str, rtype: str, mac: str = "", ip: str = "") -> pb.LifecycleEvent:
    ev = pb.LifecycleEvent(category=pb.ASYNC_JOB, event_type="X", resource_type=rtype, resource_uuid=uuid)
    ev.account_uuid, ev.mac, ev.ip_address = ADMIN, mac, ip
    return finish(ev)


EVENTS = [
    usage("VM.CREATE", 0, A, uuid=VM),
    usage("VM.DESTROY", 5, A, uuid=VM),
    usage("VM.CREATE", 5, B, uuid=VM),  # moved to B at 5 h
    job(VM, "VirtualMachine", mac="02:00:00:00:00:01", ip="10.1.1.5"),
    usage("VM.CREATE", 0, B, uuid=OTHER_VM),
    job(OTHER_VM, "VirtualMachine", mac="02:00:00:00:00:02", ip="10.1.1.5"),  # same guest IP, other network
    usage("NET.IPASSIGN", 0, A, uuid=PUB),
    usage("NET.IPRELEASE", 2, A, uuid=PUB),
    usage("NET.IPASSIGN", 3, B, uuid=PUB),
    job(PUB, "IpAddress", ip=PUB_ADDR),
    usage("VM.CREATE", 0, A, uuid="vm-old"),
    usage("VM.DESTROY", 2, A, uuid="vm-old"),
    job("vm-old", "VirtualMachine", mac="02:00:00:00:00:07", ip="10.9.9.9"),
    usage("VM.CREATE", 8, B, uuid="vm-new-2"),
    job("vm-new-2", "VirtualMachine", mac="02:00:00:00:00:08", ip="10.9.9.9"),
]


def hint(account: str) -> dict[str, str]:
    return {"ownerAccountUuid": account}


ROUTERS = {
    "r-7-VM": "acct-net-7",
    "uuid-of-r-8": "acct-net-8",
    "198.51.100.77": "acct-static-ip",
    "02:00:00:00:00:99": "acct-static-mac",
    PUB_ADDR: "acct-map-loses",  # lifecycle knows this IP: its answer (even None) stands
}

# name, measure, expected owner
CASES = [
    ("instance uuid", measure(1, instance_uuid=VM), A),
    ("instance uuid after an ownership move", measure(6, instance_uuid=VM), B),
    ("instance uuid beats the hint", measure(1, instance_uuid=VM, owner_hint=hint("X")), A),
    ("hint for an instance without lifecycle",
     measure(1, instance_uuid="vm-new", owner_hint=hint("acct-h")), "acct-h"),
    ("hint 'unknown' is no owner", measure(1, instance_uuid="vm-new", owner_hint=hint("unknown")), None),
    ("router: network owner from its metadata",
     measure(1, domain_name="r-5-VM", instance_uuid="uuid-of-r-5", owner_hint=hint("acct-net")),
     "acct-net"),
    ("router: operator map by domain name", measure(1, domain_name="r-7-VM", instance_uuid="uuid-of-r-7"),
     "acct-net-7"),
    ("router: operator map by uuid", measure(1, domain_name="r-8-VM", instance_uuid="uuid-of-r-8"),
     "acct-net-8"),
    ("router without metadata or map", measure(1, domain_name="r-9-VM", instance_uuid="uuid-of-r-9"), None),
    ("MAC", measure(1, mac="02:00:00:00:00:01"), A),
    ("MAC, any case", measure(6, mac="02:00:00:00:00:01".upper()), B),
    ("unknown MAC falls through to the IP", measure(1, mac="02:ff:00:00:00:01", address=PUB_ADDR), A),
    ("public IP while assigned", measure(1, address=PUB_ADDR), A),
    ("public IP after release", measure(2.5, address=PUB_ADDR), None),
    ("public IP reassigned", measure(4, address=PUB_ADDR), B),
    ("public IP before it was assigned", measure(-1, address=PUB_ADDR), None),
    ("guest IP held by VMs of two owners", measure(1, address="10.1.1.5"), None),
    ("guest IP held by two VMs of one owner", measure(6, address="10.1.1.5"), B),
    ("guest IP reused after its first VM was destroyed", measure(9, address="10.9.9.9"), B),
    ("guest IP while its first VM lived", measure(1, address="10.9.9.9"), A),
    ("MAC a minute before its VM is created (clock skew)", measure(8 - 1 / 60, mac="02:00:00:00:00:08"), B),
    ("MAC long before its VM existed", measure(7, mac="02:00:00:00:00:08"), None),
    ("MAC after its VM was destroyed", measure(3, mac="02:00:00:00:00:07"), None),
    ("operator map by IP (a legacy measure)", measure(1, address="198.51.100.77"), "acct-static-ip"),
    ("operator map by MAC", measure(1, mac="02:00:00:00:00:99", address="198.51.100.77"), "acct-static-mac"),
    ("lifecycle IP evidence before the operator map", measure(1, address=PUB_ADDR), A),
    ("nothing known", measure(1, address="198.51.100.1"), None),
    ("no evidence at all", measure(1), None),
]  # fmt: skip


@pytest.mark.parametrize(("name", "m", "expected"), CASES, ids=[c[0] for c in CASES])
def test_owner_at(name: str, m: Measure, expected: str | None) -> None:
    index = OwnerIndex(build_history(EVENTS), routers=ROUTERS)
    assert index.owner_at(m) == expected


def test_lifecycle_arriving_later_attributes_a_parked_measure() -> None:
    index = OwnerIndex(routers={})
    m = measure(1, instance_uuid="vm-late", mac="02:00:00:00:00:09")
    assert index.owner_at(m) is None  # the adapter parks it
    late = build_history([usage("VM.START", 0.5, "acct-late", uuid="vm-late")])
    index.update(late["vm-late"])
    assert index.owner_at(m) == "acct-late"


def test_update_replaces_and_remove_forgets() -> None:
    histories = build_history(EVENTS)
    index = OwnerIndex(histories)
    by_mac = measure(1, mac="02:00:00:00:00:02")
    assert index.owner_at(by_mac) == B
    index.remove(OTHER_VM)
    assert index.owner_at(by_mac) is None
    assert index.owner_at(measure(1, address="10.1.1.5")) == A  # only one holder left
    index.update(histories[OTHER_VM])
    assert index.owner_at(by_mac) == B
    index.update(histories[OTHER_VM])  # idempotent
    assert index.owner_at(measure(1, address="10.1.1.5")) is None


def test_history_without_an_owner_is_not_a_guess() -> None:
    state = pb.LifecycleEvent(
        category=pb.RESOURCE_STATE, resource_type="VirtualMachine", resource_uuid="vm-s"
    )
    state.time, state.status = T0, "postStateTransitionEvent"
    state.attributes["old-state"], state.attributes["new-state"] = "Starting", "Running"
    index = OwnerIndex(build_history([finish(state)]))
    assert index.owner_at(measure(1, instance_uuid="vm-s")) is None


@pytest.mark.parametrize(
    ("name", "expected"),
    [("r-5-VM", True), ("r-1234-VM", True), ("i-2-10-VM", False), ("s-1-VM", False), ("router", False)],
)
def test_is_router(name: str, expected: bool) -> None:
    assert is_router(name) is expected


# -- a stopped VM's bytes (the doubt): by its running segments, widened by the clock skew ------
@st.composite
def running_segments(draw: st.DrawFn) -> list[Segment]:
    """Apart and in time order, as the state machine builds them; the last one maybe open."""
    segments, at = [], T0
    for _ in range(draw(st.integers(0, 6))):
        at += draw(st.integers(0, 3 * CLOCK_SKEW_MS))
        length = draw(st.integers(1, 3 * CLOCK_SKEW_MS))
        segments.append(Segment(at, at + length))
        at += length
    if segments and draw(st.booleans()):
        segments[-1] = Segment(segments[-1].start_ms, None)
    return segments


@settings(max_examples=500, deadline=None)
@given(running=running_segments(), offset=st.integers(-CLOCK_SKEW_MS * 2, 30 * CLOCK_SKEW_MS))
def test_running_near_is_any_running_segment_widened_by_the_skew(running: list[Segment], offset: int) -> None:
    history, at = ResourceHistory("vm", running=running), T0 + offset
    widened = any(
        s.start_ms - CLOCK_SKEW_MS <= at and (s.end_ms is None or at < s.end_ms + CLOCK_SKEW_MS)
        for s in running
    )
    assert running_near(history, at) == (widened or not running)
    since = running_since(history)  # the aggregation's shortcut: from then on, no doubt
    assert at < since or running_near(history, at)


def test_a_stopped_vms_bytes_have_no_owner_in_an_open_window_only() -> None:
    """Stopped at 1 h: bytes at 2 h are doubted in a window still open, plainly its owner's in
    one already final (nothing waits for a final window); the last poll's bytes just after the
    stop are not doubted."""
    index = OwnerIndex()
    index.update(ResourceHistory("vm-1", owners=[OwnerChange(T0, A)], running=[Segment(T0, T0 + H)]))
    late = measure(2, instance_uuid="vm-1")
    assert index.owner_at(late, open_from=T0) is None
    assert index.owner_at(late, open_from=T0 + 3 * H) == A
    assert index.owner_at(late) == A
    tail = measure(1 + 2 * 60_000 / H, instance_uuid="vm-1")
    assert index.owner_at(tail, open_from=T0) == A
