"""The reconciler under a non-default billing policy: its corrections are events the policy
honours, so the corrected view agrees with CloudStack and a pass run again changes nothing."""

from __future__ import annotations

from collections.abc import Sequence

from kvmeter.collector.cloudstack import parse_event
from kvmeter.collector.cs_snapshot import Snapshot
from kvmeter.collector.lifecycle import build_history
from kvmeter.collector.model import ResourceHistory
from kvmeter.collector.policy import BillingPolicy
from kvmeter.collector.reconcile import Findings, Witness, reconcile, view_of
from kvmeter.proto import pb
from tests.unit.cs_events import T0, H, state, usage
from tests.unit.test_reconcile import ALICE, LIFE, VM, snap, vm

STATE_RUNNING = BillingPolicy(running="state")
EXPUNGE = BillingPolicy(allocated_until="expunge")
FIRST_START = BillingPolicy(allocated_from="first_start")


def run(
    policy: BillingPolicy,
    events: Sequence[pb.LifecycleEvent],
    now: Snapshot,
    before: Snapshot | None = None,
    witness: dict[str, Witness] | None = None,
) -> tuple[Findings, list[pb.LifecycleEvent]]:
    by_resource: dict[str, list[pb.LifecycleEvent]] = {}
    for ev in events:
        by_resource.setdefault(ev.resource_uuid, []).append(ev)
    found = reconcile(view_of(by_resource, build_history(events, policy), witness), now, before, policy)
    fixed = [parse_event(c.event_value(), c.resource_uuid.encode()) for c in found.corrections]
    return found, [*events, *fixed]


def spans(history: ResourceHistory, kind: str) -> list[tuple[float, float | None]]:
    return [
        ((s.start_ms - T0) / H, None if s.end_ms is None else (s.end_ms - T0) / H)
        for s in getattr(history, kind)
    ]


def settled(policy: BillingPolicy, events: list[pb.LifecycleEvent], now: Snapshot, before: Snapshot) -> bool:
    again, _ = run(policy, events, now, before)
    return again.corrections == []


def test_running_from_state_events_is_corrected_by_state_events() -> None:
    life = [usage("VM.CREATE", 0, ALICE, "small"), *_state_start(1)]
    now, before = snap(5, VirtualMachines=[vm("Stopped")]), snap(3, VirtualMachines=[vm("Stopped")])
    found, fixed = run(STATE_RUNNING, life, now, before)
    [c] = found.corrections
    assert (c.event_type, c.time_ms, c.states) == ("VM.STOP", T0 + 3 * H, ("Running", "Stopped"))
    assert parse_event(c.event_value()).category == pb.RESOURCE_STATE
    assert spans(build_history(fixed, STATE_RUNNING)[VM], "running") == [(1, 3)]
    assert settled(STATE_RUNNING, fixed, now, before)
    # The same lost stop under the default is a usage VM.STOP (state events would do too, but
    # the default's corrections stay what they were).
    found, _ = run(BillingPolicy(), life, now, before)
    assert [(c.event_type, c.states) for c in found.corrections] == [("VM.STOP", None)]


def test_a_lost_start_under_running_from_state() -> None:
    life = [usage("VM.CREATE", 0, ALICE, "small")]
    now, before = snap(5, VirtualMachines=[vm("Running")]), snap(3, VirtualMachines=[vm("Running")])
    found, fixed = run(STATE_RUNNING, life, now, before)
    [c] = found.corrections
    assert (c.event_type, c.states, c.account) == ("VM.START", ("Stopped", "Running"), ALICE)
    history = build_history(fixed, STATE_RUNNING)[VM]
    assert spans(history, "running") == [(3, None)]
    assert history.running[0].account == ALICE  # the owner from the usage events
    assert settled(STATE_RUNNING, fixed, now, before)


def test_a_destroy_under_running_from_state_closes_both_with_two_events() -> None:
    life = [usage("VM.CREATE", 0, ALICE, "small"), *_state_start(1)]
    found, fixed = run(STATE_RUNNING, life, snap(5), snap(3))
    assert [(c.event_type, c.states) for c in found.corrections] == [
        ("VM.DESTROY", ("Running", "Destroyed")),
        ("VM.DESTROY", None),
    ]
    history = build_history(fixed, STATE_RUNNING)[VM]
    assert spans(history, "running") == [(1, 3)]
    assert spans(history, "allocated") == [(0, 3)]
    assert settled(STATE_RUNNING, fixed, snap(5), snap(3))


def test_until_expunge_a_destroyed_vm_stays_allocated_and_a_vanished_one_is_expunged() -> None:
    life = [*LIFE, usage("VM.STOP", 2, ALICE), usage("VM.DESTROY", 2.5, ALICE)]
    destroyed = [vm("Destroyed")]
    found, _ = run(EXPUNGE, life, snap(5, VirtualMachines=destroyed), snap(3, VirtualMachines=destroyed))
    assert found.corrections == []  # listed as Destroyed: still allocated under this policy
    found, fixed = run(EXPUNGE, life, snap(5), snap(3))  # no longer listed: expunged
    [c] = found.corrections
    assert (c.event_type, c.time_ms, c.account) == ("VM.EXPUNGE", T0 + 3 * H, ALICE)
    assert "expunge event lost" in c.reason
    history = build_history(fixed, EXPUNGE)[VM]
    assert spans(history, "allocated") == [(0, 3)]
    assert settled(EXPUNGE, fixed, snap(5), snap(3))
    # Under the default the same history was closed at the destroy: nothing to correct.
    assert run(BillingPolicy(), life, snap(5), snap(3))[0].corrections == []


def test_until_expunge_a_running_vm_destroyed_unseen_stops_running_only() -> None:
    destroyed = [vm("Destroyed")]
    now, before = snap(5, VirtualMachines=destroyed), snap(3, VirtualMachines=destroyed)
    found, fixed = run(EXPUNGE, LIFE, now, before)
    [c] = found.corrections
    assert c.event_type == "VM.DESTROY"
    history = build_history(fixed, EXPUNGE)[VM]
    assert spans(history, "running") == [(1, 3)]
    assert spans(history, "allocated") == [(0, None)]
    assert settled(EXPUNGE, fixed, now, before)
    found, fixed = run(EXPUNGE, LIFE, snap(5), snap(3))  # gone altogether: one expunge closes both
    assert [c.event_type for c in found.corrections] == ["VM.EXPUNGE"]
    history = build_history(fixed, EXPUNGE)[VM]
    assert spans(history, "running") == [(1, 3)]
    assert spans(history, "allocated") == [(0, 3)]


def test_first_start_a_created_vm_never_started_needs_no_correction() -> None:
    life = [usage("VM.CREATE", 0, ALICE, "small")]
    stopped = [vm("Stopped")]
    found, _ = run(FIRST_START, life, snap(5, VirtualMachines=stopped), snap(3, VirtualMachines=stopped))
    assert found.corrections == []
    running = [vm("Running")]
    now, before = snap(5, VirtualMachines=running), snap(3, VirtualMachines=running)
    found, fixed = run(FIRST_START, life, now, before)
    assert [(c.event_type, c.time_ms) for c in found.corrections] == [("VM.START", T0 + 3 * H)]
    history = build_history(fixed, FIRST_START)[VM]
    assert spans(history, "allocated") == spans(history, "running") == [(3, None)]
    assert settled(FIRST_START, fixed, now, before)


def _state_start(hours: float) -> list[pb.LifecycleEvent]:
    """A start told by a resource-state event (with the usage event naming the owner)."""
    return [state("Starting", "Running", hours), usage("VM.START", hours, ALICE)]


def test_hidden_vm_is_closed_under_every_policy() -> None:
    """A VM CloudStack lists hidden (displayvm=false) in two passes has no VM time in its usage:
    the policy's corrections end RUNNING and ALLOCATED at the earlier pass, and open nothing."""
    hidden = {**vm("Running"), "displayvm": False}
    now, before = snap(5, VirtualMachines=[hidden]), snap(3, VirtualMachines=[hidden])
    for policy in (BillingPolicy(), STATE_RUNNING, EXPUNGE, FIRST_START):
        life = [usage("VM.CREATE", 0, ALICE, "small"), *_state_start(1)]
        found, fixed = run(policy, life, now, before)
        assert found.corrections, policy
        assert all("displayvm" in c.reason for c in found.corrections)
        history = build_history(fixed, policy)[VM]
        start = 1 if policy is FIRST_START else 0
        assert spans(history, "running") == [(1, 3)], policy
        assert spans(history, "allocated") == [(start, 3)], policy
        assert settled(policy, fixed, now, before), policy
