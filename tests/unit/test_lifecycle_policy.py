"""The billing policy's variants on one event history: every combination of ALLOCATED's opener
and closer with RUNNING's source, the segments written out by hand from the history below."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmeter.collector.lifecycle import build_history, build_resource_history
from kvmeter.collector.model import ResourceHistory, Segment
from kvmeter.collector.policy import CHOICES, DEFAULT_POLICY, POLICY_SCHEMA, BillingPolicy, policy_from
from kvmeter.proto import pb
from kvmeter.tomlconfig import schema_problems
from tests.unit.cs_events import T0, VM, A, H, state, usage, vm_events
from tests.unit.test_lifecycle_skew import implied_running, skewed_deliveries, well_formed

IP = "ip-1"

# One VM's life, with CloudStack's usage events and resource-state events disagreeing now and
# then (a state event stamped later than its usage event, a power-off the usage event tells late),
# a destroy, a recovery, a second destroy and the expunge; and one IP address.
HISTORY = [
    usage("VM.CREATE", 0, offering="small"),
    usage("NET.IPASSIGN", 0.5, uuid=IP),
    usage("VM.START", 1),
    state("Starting", "Running", 1.25),
    state("Running", "Stopped", 2),  # out-of-band power-off
    usage("VM.STOP", 3),  # ... whose usage event comes an hour late
    usage("VM.START", 4),
    state("Starting", "Running", 4.5),
    usage("VM.STOP", 5),
    state("Running", "Stopped", 5),
    usage("VM.DESTROY", 6),
    state("Stopped", "Destroyed", 6),
    usage("VM.CREATE", 7),  # recovered: Destroyed -> Stopped
    state("Destroyed", "Stopped", 7),
    usage("VM.DESTROY", 8),
    state("Stopped", "Destroyed", 8),
    usage("NET.IPRELEASE", 8.5, uuid=IP),
    state("Destroyed", "Expunging", 9),
]


def seg(start: float, end: float | None) -> Segment:
    return Segment(T0 + int(start * H), None if end is None else T0 + int(end * H), "small", A)


RUNNING = {
    "usage_and_state": [seg(1, 2), seg(4, 5)],  # whichever comes first
    "usage": [seg(1, 3), seg(4, 5)],  # CloudStack's usage server
    "state": [seg(1.25, 2), seg(4.5, 5)],  # the hypervisor's transitions
}


@dataclass(frozen=True)
class Variant:
    allocated_from: str
    allocated_until: str
    running: str
    allocated: list[Segment]


VARIANTS = [
    # from create: the recovery's second allocation is billed
    Variant("create", "destroy", "usage_and_state", [seg(0, 6), seg(7, 8)]),
    Variant("create", "destroy", "usage", [seg(0, 6), seg(7, 8)]),
    Variant("create", "destroy", "state", [seg(0, 6), seg(7, 8)]),
    # until expunge: destroyed and recovered is one allocation, to the expunge
    Variant("create", "expunge", "usage_and_state", [seg(0, 9)]),
    Variant("create", "expunge", "usage", [seg(0, 9)]),
    Variant("create", "expunge", "state", [seg(0, 9)]),
    # from the first start (by the RUNNING source's start); the recovered VM never started again
    Variant("first_start", "destroy", "usage_and_state", [seg(1, 6)]),
    Variant("first_start", "destroy", "usage", [seg(1, 6)]),
    Variant("first_start", "destroy", "state", [seg(1.25, 6)]),
    Variant("first_start", "expunge", "usage_and_state", [seg(1, 9)]),
    Variant("first_start", "expunge", "usage", [seg(1, 9)]),
    Variant("first_start", "expunge", "state", [seg(1.25, 9)]),
]


@pytest.mark.parametrize(
    "variant", VARIANTS, ids=[f"{v.allocated_from}-{v.allocated_until}-{v.running}" for v in VARIANTS]
)
def test_every_variant_on_one_history(variant: Variant) -> None:
    policy = BillingPolicy(variant.allocated_from, variant.allocated_until, variant.running)
    histories = build_history(HISTORY, policy)
    vm = histories[VM]
    assert vm.running == RUNNING[variant.running]
    assert vm.allocated == variant.allocated
    assert vm.ip == []
    assert not vm.allocation_pending  # the recovered VM was destroyed again
    assert histories[IP].ip == [Segment(T0 + H // 2, T0 + int(8.5 * H), "", A)]  # assign to release
    assert len(vm.applied) + len(vm.ignored) == len([e for e in HISTORY if e.resource_uuid == VM])


def test_the_table_covers_every_combination() -> None:
    seen = {(v.allocated_from, v.allocated_until, v.running) for v in VARIANTS}
    keys = ("allocated_from", "allocated_until", "running")
    assert seen == set(itertools.product(*(CHOICES[k] for k in keys)))


def test_the_default_is_todays_machine() -> None:
    assert build_history(HISTORY, DEFAULT_POLICY) == build_history(HISTORY)
    assert DEFAULT_POLICY == BillingPolicy("create", "destroy", "usage_and_state", "assign", "release")


def test_first_start_waits_for_a_start_and_ends_unbilled_without_one() -> None:
    policy = BillingPolicy(allocated_from="first_start")
    created = build_history([usage("VM.CREATE", 0, offering="small")], policy)[VM]
    assert created.allocated == []
    assert created.allocation_pending
    destroyed = build_history([usage("VM.CREATE", 0), usage("VM.DESTROY", 2)], policy)[VM]
    assert destroyed.allocated == []
    assert not destroyed.allocation_pending
    assert destroyed.ignored == []  # the create made it allocatable, the destroy ended that
    # A start without a create allocates nothing (as the default: no allocation without a create).
    started = build_history([usage("VM.START", 1)], policy)[VM]
    assert started.running == [Segment(T0 + H, None, "", A)]
    assert started.allocated == []


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_first_start_at_the_create_instant_in_any_order(order: tuple[int, ...]) -> None:
    events = [usage("VM.CREATE", 1, offering="small"), usage("VM.START", 1), state("Starting", "Running", 1)]
    history = build_history([events[i] for i in order], BillingPolicy(allocated_from="first_start"))[VM]
    assert history.allocated == [Segment(T0 + H, None, "small", A)]
    assert [(s.start_ms, s.end_ms) for s in history.running] == [(T0 + H, None)]


def test_first_start_follows_the_offering_of_the_start() -> None:
    events = [usage("VM.CREATE", 0, offering="small"), usage("VM.START", 2, offering="large")]
    history = build_history(events, BillingPolicy(allocated_from="first_start"))[VM]
    assert history.allocated == [Segment(T0 + 2 * H, None, "large", A)]


def test_expunge_closes_running_too_and_the_reconcilers_expunge_closes_under_every_policy() -> None:
    events = [usage("VM.CREATE", 0), usage("VM.START", 1), state("Running", "Expunging", 3)]
    expunging = build_history(events, BillingPolicy(allocated_until="expunge", running="usage"))[VM]
    assert expunging.running == [Segment(T0 + H, T0 + 3 * H, "", A)]
    assert expunging.allocated == [Segment(T0, T0 + 3 * H, "", A)]
    for values in itertools.product(*CHOICES.values()):
        policy = BillingPolicy(*values)
        gone = [usage("VM.CREATE", 0), usage("VM.START", 1), state("Starting", "Running", 1)]
        history = build_history([*gone, usage("VM.EXPUNGE", 4)], policy)[VM]
        assert all(s.end_ms == T0 + 4 * H for s in (*history.running, *history.allocated)), policy
        assert history.running
        assert not history.allocation_pending


def test_a_state_event_to_expunging_under_destroy_closes_running_only() -> None:
    events = [usage("VM.CREATE", 0), usage("VM.START", 1), state("Running", "Expunging", 3)]
    history = build_history(events)[VM]
    assert history.running == [Segment(T0 + H, T0 + 3 * H, "", A)]
    assert history.allocated == [Segment(T0, None, "", A)]


def test_running_from_state_keeps_usage_starts_for_offerings_and_owners() -> None:
    events = [
        usage("VM.CREATE", 0, offering="small"),
        state("Starting", "Running", 1),
        usage("VM.START", 2, offering="large"),  # a restart on a new offering: splits
        usage("VM.STOP", 3),  # not a state event: RUNNING stays open
    ]
    history = build_history(events, BillingPolicy(running="state"))[VM]
    assert history.running == [Segment(T0 + H, T0 + 2 * H, "small", A), Segment(T0 + 2 * H, None, "large", A)]


# --- the config section --------------------------------------------------------------------


def test_the_schema_refuses_unknown_values_and_keys() -> None:
    section = {"allocated_from": "boot", "running": "usage", "ip_until": "forever", "allocated_to": "x"}
    problems = schema_problems({"properties": {"policy": POLICY_SCHEMA}}, {"policy": section})
    allowed = "allocated_from, allocated_until, ip_from, ip_until, running"
    assert problems == [
        f"policy.allocated_to: unknown key (allowed here: {allowed})",
        "policy.allocated_from: 'boot' is not one of ['create', 'first_start']",
        "policy.ip_until: 'forever' is not one of ['release']",
    ]
    assert policy_from({"running": "state"}) == BillingPolicy(running="state")
    with pytest.raises(ValueError, match=r"policy\.running: 'both' is not one of"):
        BillingPolicy(running="both")


# --- properties, under every policy -----------------------------------------------------------


@st.composite
def vm_events_with_expunges(draw: st.DrawFn) -> list[pb.LifecycleEvent]:
    events = draw(vm_events())
    for hours in draw(st.lists(st.integers(0, 12), max_size=2)):
        if draw(st.booleans()):
            events.append(state(draw(st.sampled_from(["Destroyed", "Stopped"])), "Expunging", hours / 2))
        else:
            events.append(usage("VM.EXPUNGE", hours / 2))
    return events


def _check_well_formed(history: ResourceHistory) -> None:
    for segments in (history.running, history.allocated, history.ip):
        for earlier, later in itertools.pairwise(segments):
            assert earlier.end_ms is not None
            assert earlier.end_ms <= later.start_ms
        for s in segments:
            assert s.end_ms is None or s.start_ms < s.end_ms
            assert s.account == (history.owner_at(s.start_ms) or "")


POLICIES = [BillingPolicy(*values) for values in itertools.product(*CHOICES.values())]


@settings(deadline=None, max_examples=150)
@given(events=vm_events_with_expunges(), data=st.data(), policy=st.sampled_from(POLICIES))
def test_any_permutation_and_duplication_gives_the_same_history_under_any_policy(
    events: list[pb.LifecycleEvent], data: st.DataObject, policy: BillingPolicy
) -> None:
    reference = build_history(events, policy)
    shuffled = data.draw(st.permutations(events))
    duplicated = shuffled + data.draw(st.lists(st.sampled_from(events), max_size=5)) if events else shuffled
    assert build_history(duplicated, policy) == reference
    for history in reference.values():
        _check_well_formed(history)


@settings(max_examples=200, deadline=None)
@given(skewed_deliveries(), st.sampled_from(POLICIES), st.randoms(use_true_random=False))
def test_clock_skew_under_any_policy_the_last_delivered_event_it_reads_decides(
    events: list[pb.LifecycleEvent], policy: BillingPolicy, rnd: random.Random
) -> None:
    history = build_resource_history(VM, events, policy)
    well_formed(history)
    read = [
        ev
        for ev in events
        if implied_running(ev) is not None
        and (policy.running_by_usage if ev.category == pb.USAGE else policy.running_by_state)
    ]
    is_running = bool(history.running) and history.running[-1].end_ms is None
    assert is_running == (bool(read) and implied_running(read[-1]) is True)
    again = events * 2
    rnd.shuffle(again)
    assert build_resource_history(VM, again, policy) == history
