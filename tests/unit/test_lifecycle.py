"""The lifecycle state machine: one table row per CloudStack case, properties for order."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmeter.collector.lifecycle import as_read, build_history, build_resource_history
from kvmeter.collector.model import OwnerChange, ResourceHistory, Segment
from kvmeter.proto import pb
from tests.unit.cs_events import ADMIN, T0, VM, A, B, H, action, finish, state, usage, vm_events

IP = "ip-1"


def seg(start: float, end: float | None, offering: str = "", account: str = A, address: str = "") -> Segment:
    return Segment(
        T0 + int(start * H), None if end is None else T0 + int(end * H), offering, account, address
    )


@dataclass
class Case:
    name: str
    events: list[pb.LifecycleEvent]
    running: list[Segment]
    allocated: list[Segment]
    ignored: int = 0  # how many events changed nothing


CASES = [
    Case("create opens allocated", [usage("VM.CREATE", 0)], [], [seg(0, None)]),
    Case("create start stop", [usage("VM.CREATE", 0), usage("VM.START", 1), usage("VM.STOP", 2)],
         [seg(1, 2)], [seg(0, None)]),
    Case("never stopped stays open", [usage("VM.START", 1)], [seg(1, None)], []),
    Case("START START is one start", [usage("VM.START", 1), usage("VM.START", 1.5), usage("VM.STOP", 2)],
         [seg(1, 2)], [], ignored=1),
    Case("STOP STOP is one stop", [usage("VM.START", 1), usage("VM.STOP", 2), usage("VM.STOP", 3)],
         [seg(1, 2)], [], ignored=1),
    Case("stop without a known start opens nothing", [usage("VM.STOP", 2)], [], [], ignored=1),
    Case("start with another offering while running splits",
         [usage("VM.CREATE", 0, offering="small"), usage("VM.START", 1, offering="small"),
          usage("VM.START", 2, offering="large"), usage("VM.STOP", 3)],
         [seg(1, 2, "small"), seg(2, 3, "large")], [seg(0, 2, "small"), seg(2, None, "large")]),
    Case("start without an offering inherits the last one",
         [usage("VM.CREATE", 0, offering="small"), usage("VM.START", 1)],
         [seg(1, None, "small")], [seg(0, None, "small")]),
    Case("start with the same offering while running is a duplicate",
         [usage("VM.START", 1, offering="small"), usage("VM.START", 2, offering="small")],
         [seg(1, None, "small")], [], ignored=1),
    Case("upgrade splits allocated only",
         [usage("VM.CREATE", 0, offering="small"), usage("VM.UPGRADE", 5, offering="large")],
         [], [seg(0, 5, "small"), seg(5, None, "large")]),
    Case("upgrade to the same offering changes nothing",
         [usage("VM.CREATE", 0, offering="small"), usage("VM.UPGRADE", 5, offering="small")],
         [], [seg(0, None, "small")], ignored=1),
    Case("upgrade of an unknown allocation opens nothing", [usage("VM.UPGRADE", 5, offering="large")],
         [], [], ignored=1),
    Case("dynamic scale splits running and allocated",
         [usage("VM.CREATE", 0, offering="small"), usage("VM.START", 1),
          usage("VM.DYNAMIC.SCALE", 2, offering="large"), usage("VM.STOP", 4)],
         [seg(1, 2, "small"), seg(2, 4, "large")], [seg(0, 2, "small"), seg(2, None, "large")]),
    Case("destroy closes running and allocated",
         [usage("VM.CREATE", 0), usage("VM.START", 1), usage("VM.DESTROY", 3)], [seg(1, 3)], [seg(0, 3)]),
    Case("recover after destroy reopens allocated",
         [usage("VM.CREATE", 0), usage("VM.DESTROY", 1), usage("VM.CREATE", 2)],
         [], [seg(0, 1), seg(2, None)]),
    Case("out-of-band power off closes running; the usage STOP after it is a duplicate",
         [usage("VM.START", 1), state("Running", "Stopped", 2), usage("VM.STOP", 2.01)],
         [seg(1, 2)], [], ignored=1),
    Case("HA: power off then restart elsewhere",
         [usage("VM.START", 1), state("Running", "Stopped", 2), state("Starting", "Running", 3),
          usage("VM.START", 3)],
         [seg(1, 2), seg(3, None)], [], ignored=1),
    Case("state event alone opens running (owner from usage events)",
         [usage("VM.CREATE", 0), state("Starting", "Running", 1)], [seg(1, None)], [seg(0, None)]),
    Case("pre-transition state events are ignored",
         [usage("VM.START", 1), state("Running", "Stopped", 2, status="preStateTransitionEvent")],
         [seg(1, None)], [], ignored=1),
    Case("state events of other resource types never touch RUNNING",
         [usage("VM.START", 1), state("Running", "Stopped", 2, resource_type="Network")],
         [seg(1, None)], [], ignored=1),
    Case("migration keeps running", [usage("VM.START", 1), state("Running", "Migrating", 2),
                                     state("Migrating", "Running", 2.5)], [seg(1, None)], [], ignored=2),
    # CloudStack publishes no VM.STOP for Migrating -> Stopped (no usage impact): the state event ends it
    Case("a stop while migrating closes running until the next start",
         [usage("VM.START", 1), state("Running", "Migrating", 2), state("Migrating", "Stopped", 3),
          usage("VM.START", 4)], [seg(1, 3), seg(4, None)], [], ignored=1),
    Case("action events change nothing (they carry the caller)",
         [usage("VM.CREATE", 0), action("VM.START", 1), action("VM.STOP", 2), action("VM.DESTROY", 3)],
         [], [seg(0, None)], ignored=3),
    Case("a late STOP corrects the past",
         [usage("VM.START", 1), usage("VM.START", 3), usage("VM.STOP", 2)], [seg(1, 2), seg(3, None)], []),
    Case("an identical duplicate counts once",
         [usage("VM.START", 1), usage("VM.START", 1), usage("VM.STOP", 2)], [seg(1, 2)], []),
    Case("stop and start in the same instant while running: a restart, so the VM runs",
         [usage("VM.START", 1), usage("VM.START", 2), usage("VM.STOP", 2)], [seg(1, 2), seg(2, None)], []),
    Case("a start and a power-off state event in one instant while stopped: it ran for no time",
         [usage("VM.START", 1), usage("VM.STOP", 2), usage("VM.START", 2.5),
          state("Running", "Stopped", 2.5)],
         [seg(1, 2)], []),
    Case("another usage type's offering is not the VM's",
         [usage("VM.CREATE", 0, offering="small"), usage("NETWORK.OFFERING.ASSIGN", 1, offering="net-off"),
          usage("VM.START", 2)],
         [seg(2, None, "small")], [seg(0, None, "small")], ignored=1),
    Case("unknown usage types are kept but ignored",
         [usage("VM.CREATE", 0), usage("VOLUME.CREATE", 1), usage("NETWORK.OFFERING.REMOVE", 2)],
         [], [seg(0, None)], ignored=2),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_vm_cases(case: Case) -> None:
    history = build_history(case.events)[VM]
    assert history.running == case.running
    assert history.allocated == case.allocated
    assert history.ip == []
    assert len(history.ignored) == case.ignored
    assert len(history.applied) + len(history.ignored) == len({e.event_id for e in case.events})


IP_CASES = [
    ("assign opens", [usage("NET.IPASSIGN", 0, uuid=IP)], [seg(0, None)]),
    ("assign release", [usage("NET.IPASSIGN", 0, uuid=IP), usage("NET.IPRELEASE", 2, uuid=IP)], [seg(0, 2)]),
    ("duplicates", [usage("NET.IPASSIGN", 0, uuid=IP), usage("NET.IPASSIGN", 1, uuid=IP),
                    usage("NET.IPRELEASE", 2, uuid=IP), usage("NET.IPRELEASE", 3, uuid=IP)], [seg(0, 2)]),
    ("reassigned to another account",
     [usage("NET.IPASSIGN", 0, uuid=IP), usage("NET.IPRELEASE", 2, uuid=IP),
      usage("NET.IPASSIGN", 3, B, uuid=IP)],
     [seg(0, 2), seg(3, None, account=B)]),
]  # fmt: skip


@pytest.mark.parametrize(("name", "events", "expected"), IP_CASES, ids=[c[0] for c in IP_CASES])
def test_ip_cases(name: str, events: list[pb.LifecycleEvent], expected: list[Segment]) -> None:
    history = build_history(events)[IP]
    assert history.ip == expected
    assert history.running == history.allocated == []
    assert history.resource_type == "IpAddress"


def test_ip_address_comes_from_any_event_about_the_ip() -> None:
    job = pb.LifecycleEvent(category=pb.ASYNC_JOB, event_type="NET.IPASSIGN", resource_type="IpAddress")
    job.resource_uuid, job.ip_address, job.account_uuid = IP, "203.0.113.5", ADMIN
    events = [usage("NET.IPASSIGN", 0, uuid=IP), finish(job), usage("NET.IPRELEASE", 1, uuid=IP)]
    history = build_history(events)[IP]
    assert history.ip == [seg(0, 1, address="203.0.113.5")]
    assert history.addresses == ["203.0.113.5"]
    assert history.owners == [OwnerChange(T0, A)]  # the job's caller is no owner


@pytest.mark.parametrize("order", [(0, 1, 2), (0, 2, 1), (2, 1, 0), (1, 2, 0)])
def test_ownership_move_in_one_second(order: tuple[int, int, int]) -> None:
    # assignVirtualMachine: VM.DESTROY for the old owner, VM.CREATE for the new, same timestamp
    events = [usage("VM.CREATE", 0, A), usage("VM.DESTROY", 5, A), usage("VM.CREATE", 5, B)]
    history = build_history([events[i] for i in order])[VM]
    assert history.allocated == [seg(0, 5, account=A), seg(5, None, account=B)]
    assert history.owners == [OwnerChange(T0, A), OwnerChange(T0 + 5 * H, B)]
    assert history.owner_at(T0 + 5 * H - 1) == A
    assert history.owner_at(T0 + 5 * H) == B
    assert history.owner_at(T0 - H) == A  # before the first event: the first known owner


def test_owner_is_unknown_without_usage_events() -> None:
    history = build_history([state("Starting", "Running", 1), action("VM.START", 1)])[VM]
    assert history.owners == []
    assert history.owner_at(T0 + H) is None
    assert history.running == [seg(1, None, account="")]


def test_macs_and_nic_addresses_are_collected() -> None:
    job = pb.LifecycleEvent(category=pb.ASYNC_JOB, event_type="VM.CREATE", resource_type="VirtualMachine")
    job.resource_uuid, job.mac, job.ip_address = VM, "02:00:00:00:00:01", "10.1.1.5"
    job.attributes["nic.1.mac"], job.attributes["nic.1.ip"] = "02:00:00:00:00:02", "192.0.2.9"
    history = build_history([finish(job), usage("VM.CREATE", 0)])[VM]
    assert history.macs == ["02:00:00:00:00:01", "02:00:00:00:00:02"]
    assert history.addresses == ["10.1.1.5", "192.0.2.9"]


def test_two_offerings_at_one_instant_leave_no_zero_length_segment() -> None:
    events = [usage("VM.START", 1, offering="small"), usage("VM.START", 1, offering="large")]
    running = build_history(events)[VM].running
    assert len(running) == 1
    assert (running[0].start_ms, running[0].end_ms) == (T0 + H, None)
    assert running[0].offering in ("small", "large")
    assert build_history(events[::-1])[VM].running == running


def test_events_are_grouped_by_resource() -> None:
    events = [usage("VM.START", 1), usage("NET.IPASSIGN", 0, uuid=IP), usage("VM.START", 2, uuid="vm-2")]
    histories = build_history(events)
    assert sorted(histories) == [IP, VM, "vm-2"]
    assert build_resource_history(VM, events) == histories[VM]


# --- properties -----------------------------------------------------------------------------


def _check_well_formed(history: ResourceHistory) -> None:
    for segments in (history.running, history.allocated, history.ip):
        for earlier, later in itertools.pairwise(segments):
            assert earlier.end_ms is not None
            assert earlier.end_ms <= later.start_ms
        for s in segments:
            assert s.end_ms is None or s.start_ms < s.end_ms
            assert s.account == (history.owner_at(s.start_ms) or "")


@settings(deadline=None, max_examples=300)
@given(events=vm_events(), data=st.data())
def test_any_permutation_and_duplication_gives_the_same_history(
    events: list[pb.LifecycleEvent], data: st.DataObject
) -> None:
    reference = build_history(events)
    shuffled = data.draw(st.permutations(events))
    duplicated = shuffled + data.draw(st.lists(st.sampled_from(events), max_size=5)) if events else shuffled
    assert build_history(duplicated) == reference
    for history in reference.values():
        _check_well_formed(history)


@settings(deadline=None, max_examples=200)
@given(events=vm_events(), extra=vm_events())
def test_a_late_event_gives_what_in_order_arrival_gives(
    events: list[pb.LifecycleEvent], extra: list[pb.LifecycleEvent]
) -> None:
    # Arrival order never matters: the history of everything equals the history of the events
    # sorted by time, whichever arrived late.
    everything = events + extra
    by_time = sorted(everything, key=lambda e: e.time)
    assert build_history(everything) == build_history(by_time)


@given(events=vm_events())
def test_an_event_as_read_gives_the_same_history(events: list[pb.LifecycleEvent]) -> None:
    for ev in events:  # audit keys the store does not keep beside the raw payload
        ev.attributes["description"], ev.attributes["user"] = "Successfully completed", "u-1"
        ev.attributes["nic.0.network"] = "net-1"
    slim = [as_read(ev) for ev in events]
    assert build_history(slim) == build_history(events)
    assert all(set(ev.attributes) <= {"old-state", "new-state"} for ev in slim)
    assert all(ev.event_id == s.event_id and ev.time == s.time for ev, s in zip(events, slim, strict=True))


def test_as_read_keeps_what_the_machine_reads() -> None:
    job = action("VM.START", 0)
    job.attributes.update({"nic.1.mac": "02:00:00:00:00:02", "nic.1.ip": "192.0.2.9", "description": "x"})
    slim = as_read(job)
    assert dict(slim.attributes) == {"nic.1.mac": "02:00:00:00:00:02", "nic.1.ip": "192.0.2.9"}
    assert "description" in job.attributes  # the event itself is left alone
    assert build_history([slim])[VM].macs == build_history([job])[VM].macs == ["02:00:00:00:00:02"]
