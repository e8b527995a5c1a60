"""Events of one instant: CloudStack stamps whole seconds, so a start and a stop often share one.

Each case settles a state with earlier events, then adds events of one instant in every order
(and duplicated): the history must be the one where the events that change the state go first.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmeter.collector.lifecycle import build_history
from kvmeter.collector.model import OwnerChange, Segment
from kvmeter.proto import pb
from tests.unit.cs_events import T0, VM, A, B, H, action, finish, state, usage

IP = "ip-1"
AT = 5  # hours after T0: the instant the events of a case share


def seg(start: float, end: float | None, offering: str = "", account: str = A) -> Segment:
    return Segment(T0 + int(start * H), None if end is None else T0 + int(end * H), offering, account)


def ip_seg(start: float, end: float | None, account: str = A) -> Segment:
    return seg(start, end, account=account)


@dataclass
class Tie:
    name: str
    before: list[pb.LifecycleEvent]  # settle the state
    same: list[pb.LifecycleEvent]  # all at AT
    running: list[Segment] = field(default_factory=list)
    allocated: list[Segment] = field(default_factory=list)
    ip: list[Segment] = field(default_factory=list)
    ignored: int = 0  # events that changed nothing
    owners: list[OwnerChange] | None = None  # checked when given


def stopped_state(hours: float) -> pb.LifecycleEvent:
    return state("Running", "Stopped", hours)


def running_state(hours: float) -> pb.LifecycleEvent:
    return state("Starting", "Running", hours)


CASES = [
    # -- a stopped VM starts and stops within the second: it ends stopped (no over-billing)
    Tie("START and STOP from created", [usage("VM.CREATE", 0)],
        [usage("VM.START", AT), usage("VM.STOP", AT)], [], [seg(0, None)]),
    Tie("START and STOP after an earlier run", [usage("VM.START", 1), usage("VM.STOP", 2)],
        [usage("VM.START", AT), usage("VM.STOP", AT)], [seg(1, 2)]),
    Tie("START and STOP as the first events ever", [],
        [usage("VM.START", AT), usage("VM.STOP", AT)], []),
    Tie("START and STOP with a new offering: allocated moves, running stays shut",
        [usage("VM.CREATE", 0, offering="small")],
        [usage("VM.START", AT, offering="large"), usage("VM.STOP", AT)],
        [], [seg(0, AT, "small"), seg(AT, None, "large")]),
    # -- a running VM stops and starts within the second (a restart): it ends running
    Tie("STOP and START while running", [usage("VM.START", 1)],
        [usage("VM.STOP", AT), usage("VM.START", AT)], [seg(1, AT), seg(AT, None)]),
    Tie("restart onto a new offering", [usage("VM.CREATE", 0, offering="small"), usage("VM.START", 1)],
        [usage("VM.STOP", AT), usage("VM.START", AT, offering="large")],
        [seg(1, AT, "small"), seg(AT, None, "large")], [seg(0, AT, "small"), seg(AT, None, "large")]),
    # -- ownership move (assignVirtualMachine): DESTROY by the old owner, CREATE by the new
    Tie("ownership move", [usage("VM.CREATE", 0, A)],
        [usage("VM.DESTROY", AT, A), usage("VM.CREATE", AT, B)],
        [], [seg(0, AT, account=A), seg(AT, None, account=B)],
        owners=[OwnerChange(T0, A), OwnerChange(T0 + AT * H, B)]),
    Tie("created and destroyed within the second after a destroy",
        [usage("VM.CREATE", 0), usage("VM.DESTROY", 1)],
        [usage("VM.CREATE", AT), usage("VM.DESTROY", AT)], [], [seg(0, 1)]),
    # -- IP addresses
    Tie("IPASSIGN and IPRELEASE from unassigned", [],
        [usage("NET.IPASSIGN", AT, uuid=IP), usage("NET.IPRELEASE", AT, uuid=IP)], ip=[]),
    Tie("IPASSIGN and IPRELEASE after an earlier assignment",
        [usage("NET.IPASSIGN", 0, uuid=IP), usage("NET.IPRELEASE", 1, uuid=IP)],
        [usage("NET.IPASSIGN", AT, uuid=IP), usage("NET.IPRELEASE", AT, uuid=IP)], ip=[ip_seg(0, 1)]),
    Tie("IPRELEASE and IPASSIGN while assigned: reassigned to another account",
        [usage("NET.IPASSIGN", 0, A, uuid=IP)],
        [usage("NET.IPRELEASE", AT, A, uuid=IP), usage("NET.IPASSIGN", AT, B, uuid=IP)],
        ip=[ip_seg(0, AT, A), ip_seg(AT, None, B)],
        owners=[OwnerChange(T0, A), OwnerChange(T0 + AT * H, B)]),
    Tie("IPRELEASE and IPASSIGN while assigned, same account",
        [usage("NET.IPASSIGN", 0, uuid=IP)],
        [usage("NET.IPRELEASE", AT, uuid=IP), usage("NET.IPASSIGN", AT, uuid=IP)],
        ip=[ip_seg(0, AT), ip_seg(AT, None)]),
    # -- resource-state events mixed with usage events
    Tie("start and stop with their state events, from created", [usage("VM.CREATE", 0)],
        [state("Stopped", "Starting", AT), running_state(AT), usage("VM.START", AT),
         state("Running", "Stopping", AT), state("Stopping", "Stopped", AT), usage("VM.STOP", AT)],
        [], [seg(0, None)], ignored=2),
    Tie("restart with the state events of the stop and the start", [usage("VM.START", 1)],
        [usage("VM.STOP", AT), state("Running", "Stopping", AT), state("Stopping", "Stopped", AT),
         state("Stopped", "Starting", AT), running_state(AT), usage("VM.START", AT)],
        [seg(1, AT), seg(AT, None)], ignored=2),
    Tie("a stop and its state event are one stop", [usage("VM.START", 1)],
        [usage("VM.STOP", AT), stopped_state(AT)], [seg(1, AT)], ignored=1),
    Tie("a start and its state event are one start", [usage("VM.CREATE", 0)],
        [running_state(AT), usage("VM.START", AT)], [seg(AT, None)], [seg(0, None)], ignored=1),
    Tie("a state-only start and stop from stopped", [usage("VM.START", 1), usage("VM.STOP", 2)],
        [running_state(AT), stopped_state(AT)], [seg(1, 2)]),
    Tie("a power-off and a START while running: powered off, then started", [usage("VM.START", 1)],
        [stopped_state(AT), usage("VM.START", AT)], [seg(1, AT), seg(AT, None)]),
    Tie("a START and a power-off while stopped: it ran for no time",
        [usage("VM.START", 1), usage("VM.STOP", 2)],
        [usage("VM.START", AT), stopped_state(AT)], [seg(1, 2)]),
    Tie("pre-transition and action events in the tie change nothing", [usage("VM.START", 1)],
        [usage("VM.STOP", AT), action("VM.STOP", AT), action("VM.START", AT),
         state("Stopped", "Running", AT, status="preStateTransitionEvent")],
        [seg(1, AT)], ignored=3),
    # -- duplicates that are no-ops in every order
    Tie("two STOPs of one second while running are one stop", [usage("VM.START", 1)],
        [usage("VM.STOP", AT), usage("VM.STOP", AT, offering="small")], [seg(1, AT)], ignored=1),
    Tie("START and two STOPs from stopped: it ends stopped, one STOP a duplicate",
        [usage("VM.START", 1), usage("VM.STOP", 2)],
        [usage("VM.STOP", AT), usage("VM.START", AT), usage("VM.STOP", AT, offering="small")],
        [seg(1, 2)], ignored=1),
]  # fmt: skip


def _orders(case: Tie) -> list[list[pb.LifecycleEvent]]:
    """Every order of the instant's events (at most 120 of them), each also duplicated."""
    orders = []
    for perm in itertools.islice(itertools.permutations(case.same), 120):
        orders.append(case.before + list(perm))
        orders.append(list(perm) + case.before + list(perm[::-1]))
    return orders


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_events_of_one_instant(case: Tie) -> None:
    uuid = case.same[0].resource_uuid
    for events in _orders(case):
        history = build_history(events)[uuid]
        assert history.running == case.running
        assert history.allocated == case.allocated
        assert history.ip == case.ip
        assert len(history.ignored) == case.ignored
        if case.owners is not None:
            assert history.owners == case.owners


def _numbered(ev: pb.LifecycleEvent, n: int) -> pb.LifecycleEvent:
    """The same state event with its own id (the bus may repeat a transition)."""
    ev.attributes["n"] = str(n)
    return finish(ev)


@settings(deadline=None, max_examples=300)
@given(
    resource=st.sampled_from([VM, IP]),
    was_open=st.booleans(),
    kinds=st.lists(st.booleans(), min_size=1, max_size=6),
    with_state=st.booleans(),
    data=st.data(),
)
def test_one_instant_ends_as_the_count_of_openers_and_closers_says(
    resource: str, was_open: bool, kinds: list[bool], with_state: bool, data: st.DataObject
) -> None:
    # An independent model of the rule for one flag (RUNNING of a VM, or an IP's assignment):
    # openers and closers of one instant alternate, the one that changes the state first, so
    # the flag ends open exactly when openers - closers + (1 if it was open) > 0.
    opener, closer = ("VM.START", "VM.STOP") if resource == VM else ("NET.IPASSIGN", "NET.IPRELEASE")
    before = [usage(opener, 1, uuid=resource)] + ([] if was_open else [usage(closer, 2, uuid=resource)])
    same = []
    for n, is_opener in enumerate(kinds):
        if resource == VM and with_state and n % 2:  # state events stand in for some usage events
            same.append(_numbered(running_state(AT) if is_opener else stopped_state(AT), n))
        else:  # distinct accounts: distinct ids for events of one kind
            same.append(usage(opener if is_opener else closer, AT, f"acct-{n}", uuid=resource))
    history = build_history(data.draw(st.permutations(before + same)))[resource]
    segments = history.running if resource == VM else history.ip
    openers = sum(kinds)
    closers = len(kinds) - openers
    ends_open = openers - closers + (1 if was_open else 0) > 0
    assert (segments[-1].end_ms is None) == ends_open
    assert all(s.end_ms is None or s.start_ms < s.end_ms for s in segments)
    if was_open:  # the open segment ends at the instant when a closer applied, and may reopen
        assert (segments[0].start_ms, segments[0].end_ms) == (T0 + H, T0 + AT * H if closers else None)
        assert len(segments) == (2 if closers and ends_open else 1)
    else:  # the earlier segment stays; a new one only when the flag ends open
        assert (segments[0].start_ms, segments[0].end_ms) == (T0 + H, T0 + 2 * H)
        assert len(segments) == (2 if ends_open else 1)
    if ends_open and len(segments) == 2:
        assert segments[1].start_ms == T0 + AT * H
