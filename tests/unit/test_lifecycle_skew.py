"""Clock skew: one source's events whose stamps contradict their delivery order (several
management servers, several clocks). Table cases, then properties (hypothesis): the last
delivered event decides the state, segments never run backwards or past a closer delivered
after their opener, and any permutation or duplication of the same deliveries gives the same
history."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmeter.collector.lifecycle import MAX_SKEW_MS, build_resource_history
from kvmeter.collector.model import ResourceHistory, Segment
from kvmeter.proto import pb
from tests.unit.cs_events import T0, VM, A, H, finish, state, usage

SOURCE = "cloudstack/0"


def delivered(*events: pb.LifecycleEvent, source: str = SOURCE, first: int = 0) -> list[pb.LifecycleEvent]:
    """The events as one source delivered them, in this order (offsets first, first + 1, ...).
    The event id stays the digest of the content, as for a raw value."""
    out = []
    for seq, ev in enumerate(events, first):
        copy = pb.LifecycleEvent()
        copy.CopyFrom(ev)
        copy.delivery_source, copy.delivery_seq = source, seq
        out.append(copy)
    return out


def seg(start_s: float, end_s: float | None, offering: str = "") -> Segment:
    """A segment from seconds after T0 + 1 h."""
    base = T0 + H
    return Segment(
        base + int(start_s * 1000), None if end_s is None else base + int(end_s * 1000), offering, A
    )


def exact(ev: pb.LifecycleEvent, at_ms: int) -> pb.LifecycleEvent:
    """The event stamped at this very ms (the builders take hours)."""
    ev.time = at_ms
    return finish(ev)


def u(kind: str, seconds: float, offering: str = "") -> pb.LifecycleEvent:
    return exact(usage(kind, 1, offering=offering), T0 + H + int(seconds * 1000))


@dataclass
class Skew:
    name: str
    events: list[pb.LifecycleEvent]
    running: list[Segment]


CASES = [
    # The case: START stamped 2 s after the STOP delivered after it. By stamps it would
    # run forever; by delivery it started and stopped: a zero-length segment, dropped.
    Skew(
        "START then STOP stamped 2 s earlier: stopped, nothing billed",
        delivered(u("VM.START", 2), u("VM.STOP", 0)),
        [],
    ),
    Skew(
        "an earlier run, then the skewed pair: only the earlier run",
        delivered(u("VM.START", -100), u("VM.STOP", -50), u("VM.START", 2), u("VM.STOP", 0)),
        [seg(-100, -50)],
    ),
    # Running; a duplicate START stamped later, then the STOP: the segment ends at the STOP's own
    # stamp, never past it.
    Skew(
        "running, a skewed repeated START, then STOP: ends at the STOP's stamp",
        delivered(u("VM.START", -100), u("VM.START", 2), u("VM.STOP", 0)),
        [seg(-100, 0)],
    ),
    # A restart whose START is stamped before the STOP delivered ahead of it: running at the end,
    # the new segment starting where the old one ended (no overlap, nothing billed twice).
    Skew(
        "STOP then START stamped 2 s earlier: running again from the STOP",
        delivered(u("VM.START", -100), u("VM.STOP", 2), u("VM.START", 0)),
        [seg(-100, 2), seg(2, None)],
    ),
    # A state event agreeing with the usage STOP, both skewed against the START.
    Skew(
        "START, then a power-off state event stamped earlier: stopped",
        delivered(u("VM.START", 3), exact(state("Running", "Stopped", 1), T0 + H + 1000)),
        [],
    ),
    # Beyond MAX_SKEW_MS an inversion is a reordering (a replay, a late partition): stamps decide.
    Skew(
        "an inversion larger than the skew bound is a reordering",
        delivered(u("VM.START", 600), u("VM.STOP", 300), u("VM.START", 0)),
        [seg(0, 300), seg(600, None)],
    ),
    # Same stamps, one source: delivery order (the stamp cannot tell).
    Skew(
        "STOP then START in one second, delivered so: running",
        delivered(u("VM.START", -100), u("VM.STOP", 0), u("VM.START", 0)),
        [seg(-100, 0), seg(0, None)],
    ),
    Skew(
        "a stopped VM: STOP then START in one second, delivered so: running",
        delivered(u("VM.STOP", 0), u("VM.START", 0)),
        [seg(0, None)],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_skew_table(case: Skew) -> None:
    hist = build_resource_history(VM, case.events)
    assert hist.running == case.running
    for shuffled in (list(reversed(case.events)), case.events * 2):
        assert build_resource_history(VM, shuffled) == hist


def test_across_sources_stamps_decide() -> None:
    """Two sources (e.g. two files) give no delivery order between their events."""
    start = delivered(u("VM.START", 2), source="a.jsonl")
    stop = delivered(u("VM.STOP", 0), source="b.jsonl")
    assert build_resource_history(VM, [*start, *stop]).running == [seg(2, None)]


def test_without_a_delivery_order_stamps_decide() -> None:
    assert build_resource_history(VM, [u("VM.START", 2), u("VM.STOP", 0)]).running == [seg(2, None)]


# -- properties ------------------------------------------------------------------------------
KINDS = ["VM.START", "VM.STOP", "STATE.RUNNING", "STATE.STOPPED"]


def event(kind: str, at_ms: int) -> pb.LifecycleEvent:
    if kind == "STATE.RUNNING":
        return exact(state("Starting", "Running", 0), at_ms)
    if kind == "STATE.STOPPED":
        return exact(state("Running", "Stopped", 0), at_ms)
    return exact(usage(kind, 0), at_ms)


@st.composite
def skewed_deliveries(draw: st.DrawFn, bound: int = MAX_SKEW_MS) -> list[pb.LifecycleEvent]:
    """Starts and stops in the order they happened (true times non-decreasing), each stamped by a
    clock off by at most bound/2, so no inversion exceeds the bound; delivered in true order."""
    n = draw(st.integers(1, 10))
    true = T0 + H
    events = []
    for _ in range(n):
        true += draw(st.integers(0, 3 * bound))
        kind = draw(st.sampled_from(KINDS))
        off = draw(st.integers(-bound // 2, bound // 2))
        ev = event(kind, true + off)
        ev.attributes["n"] = str(len(events))  # distinct events (identical bytes are one event)
        events.append(finish(ev))
    return delivered(*events)


def implied_running(ev: pb.LifecycleEvent) -> bool | None:
    if ev.category == pb.RESOURCE_STATE:
        return ev.attributes["new-state"] == "Running"
    return {"VM.START": True, "VM.STOP": False}.get(ev.event_type)


def well_formed(hist: ResourceHistory) -> None:
    """Segments of each kind positive, in order, never overlapping; only the last one open."""
    for segments in (hist.running, hist.allocated, hist.ip):
        for i, s in enumerate(segments):
            assert s.end_ms is None or s.end_ms > s.start_ms
            if i + 1 < len(segments):
                assert s.end_ms is not None
                assert s.end_ms <= segments[i + 1].start_ms


@settings(max_examples=300, deadline=None)
@given(skewed_deliveries(), st.randoms(use_true_random=False))
def test_the_last_delivered_event_decides_the_state(
    events: list[pb.LifecycleEvent], rnd: random.Random
) -> None:
    hist = build_resource_history(VM, events)
    well_formed(hist)
    is_running = bool(hist.running) and hist.running[-1].end_ms is None
    assert is_running == implied_running(events[-1])
    # the same deliveries in any arrival order, duplicated: the same history (replicas, replays)
    again = events * 2
    rnd.shuffle(again)
    assert build_resource_history(VM, again) == hist


def in_delivery_order(events: list[pb.LifecycleEvent]) -> list[tuple[int, int | None]]:
    """The rule stated directly, for one source within the bound: apply in delivery order; a
    STOP closes at its stamp but never before the open; a START opens at its stamp but never
    before the last boundary."""
    out: list[tuple[int, int | None]] = []
    start: int | None = None
    floor = 0
    for ev in events:
        running = implied_running(ev)
        if running and start is None:
            start = floor = max(ev.time, floor)
        elif running is False and start is not None:
            end = max(ev.time, start)
            if end > start:
                out.append((start, end))
            start, floor = None, end
    return [*out, (start, None)] if start is not None else out


@settings(max_examples=300, deadline=None)
@given(skewed_deliveries())
def test_one_source_within_the_bound_is_applied_in_delivery_order(events: list[pb.LifecycleEvent]) -> None:
    """So no segment extends past a closer delivered after its opener, nor is negative."""
    hist = build_resource_history(VM, events)
    assert [(s.start_ms, s.end_ms) for s in hist.running] == in_delivery_order(events)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(KINDS), st.integers(1, 10 * MAX_SKEW_MS)), min_size=1, max_size=10))
def test_when_stamps_agree_with_delivery_the_order_changes_nothing(steps: list[tuple[str, int]]) -> None:
    at, events = T0 + H, []
    for kind, gap in steps:
        at += gap  # strictly increasing: no contradiction, no tie
        events.append(event(kind, at))
    assert build_resource_history(VM, delivered(*events)) == build_resource_history(VM, events)
