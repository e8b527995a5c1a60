"""The reconciler's pure core: kvmeter's view + CloudStack's answers (shaped as the API double
serves them, parsed by cs_snapshot) -> corrections, applied here as the lifecycle would."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from kvmeter.collector.attribution import OwnerIndex
from kvmeter.collector.cloudstack import parse_event
from kvmeter.collector.cs_snapshot import Snapshot, SnapshotError, parse_snapshot
from kvmeter.collector.lifecycle import build_history
from kvmeter.collector.model import Measure
from kvmeter.collector.reconcile import Findings, Witness, observe, reconcile, view_of
from kvmeter.proto import pb
from tests.harness import cloudstack_api as api
from tests.unit.cs_events import T0, H, usage

ALICE, BOB = "acct-alice", "acct-bob"
VM, IP, ROUTER = "vm-1", "ip-1", "router-1"


def cloud(**lists: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    doc = api.empty_cloud()
    doc["listAccounts"] = [api.account(ALICE, "alice"), api.account(BOB, "bob")]
    doc["listDomains"] = [api.domain()]
    doc["listServiceOfferings"] = [
        api.offering("small", "Small", 1, 512),
        api.offering("large", "Large", 2, 2048),
    ]
    for name, items in lists.items():
        doc[f"list{name}"] = items
    return doc


def snap(hours: float, **lists: list[dict[str, Any]]) -> Snapshot:
    return parse_snapshot(cloud(**lists), T0 + int(hours * H))


def vm(state: str, offering: str = "small", owner: str = "alice") -> dict[str, Any]:
    return api.vm(VM, "web-1", owner, state, offering, T0)


def run(
    events: Sequence[pb.LifecycleEvent],
    now: Snapshot,
    before: Snapshot | None = None,
    witness: dict[str, Witness] | None = None,
) -> tuple[Findings, list[pb.LifecycleEvent]]:
    """One pass; returns its findings and the events with the corrections applied."""
    by_resource: dict[str, list[pb.LifecycleEvent]] = {}
    for ev in events:
        by_resource.setdefault(ev.resource_uuid, []).append(ev)
    found = reconcile(view_of(by_resource, build_history(events), witness), now, before)
    fixed = [parse_event(c.event_value(), c.resource_uuid.encode()) for c in found.corrections]
    return found, [*events, *fixed]


def assert_settled(
    events: Sequence[pb.LifecycleEvent], now: Snapshot, before: Snapshot | None, **kw: Any
) -> None:
    """A pass run again over the corrected view changes nothing (and adds no event)."""
    again, _ = run(events, now, before, **kw)
    assert again.corrections == []


LIFE = [usage("VM.CREATE", 0, ALICE, "small"), usage("VM.START", 1, ALICE)]


def test_lost_stop_needs_a_second_witness_and_takes_its_time() -> None:
    now = snap(5, VirtualMachines=[vm("Stopped")])
    alone, _ = run(LIFE, now)
    assert alone.corrections == []
    assert "awaiting a second witness" in alone.notes[0]
    agents = {VM: Witness(running=False, since_ms=T0 + 2 * H, seen_ms=T0 + 4 * H)}
    found, fixed = run(LIFE, now, witness=agents)
    [c] = found.corrections
    assert (c.event_type, c.time_ms, c.account, c.source) == ("VM.STOP", T0 + 2 * H, ALICE, "cloudstack-api")
    assert "stop event lost" in c.reason
    history = build_history(fixed)[VM]
    assert [(s.start_ms, s.end_ms) for s in history.running] == [(T0 + H, T0 + 2 * H)]
    assert history.allocated[-1].end_ms is None
    assert_settled(fixed, now, None, witness=agents)
    # Without agents, the previous pass (after the last event) is the second witness.
    found, fixed = run(LIFE, now, snap(3, VirtualMachines=[vm("Stopped")]))
    assert [(c.event_type, c.time_ms) for c in found.corrections] == [("VM.STOP", T0 + 3 * H)]


def test_the_host_still_running_it_is_a_dispute_not_a_correction() -> None:
    agents = {VM: Witness(running=True, since_ms=T0 + H, seen_ms=T0 + 5 * H)}
    found, _ = run(
        LIFE, snap(5, VirtualMachines=[vm("Stopped")]), snap(3, VirtualMachines=[vm("Stopped")]), agents
    )
    assert found.corrections == []
    assert "still runs it" in found.notes[0]


def test_gone_twice_is_a_destroy() -> None:
    found, fixed = run(LIFE, snap(5), snap(3))
    assert [(c.event_type, c.time_ms) for c in found.corrections] == [("VM.DESTROY", T0 + 3 * H)]
    history = build_history(fixed)[VM]
    assert history.running[-1].end_ms == history.allocated[-1].end_ms == T0 + 3 * H
    assert_settled(fixed, snap(5), snap(3))


def test_lost_start() -> None:
    life = [*LIFE, usage("VM.STOP", 2, ALICE)]
    now, before = snap(5, VirtualMachines=[vm("Running")]), snap(3, VirtualMachines=[vm("Running")])
    found, fixed = run(life, now, before)
    [c] = found.corrections
    assert (c.event_type, c.time_ms, c.account, c.offering) == ("VM.START", T0 + 3 * H, ALICE, "small")
    assert build_history(fixed)[VM].running[-1].start_ms == T0 + 3 * H
    assert_settled(fixed, now, before)
    # The agents saw it running earlier than the previous pass: their time wins.
    agents = {VM: Witness(running=True, since_ms=T0 + int(2.5 * H), seen_ms=T0 + 5 * H)}
    found, _ = run(life, now, before, agents)
    assert [c.time_ms for c in found.corrections] == [T0 + int(2.5 * H)]


def test_never_guesses_an_owner() -> None:
    stranger = api.vm("vm-new", "x", "nobody-known", "Running", "small", T0)
    found, _ = run([], snap(5, VirtualMachines=[stranger]), snap(3, VirtualMachines=[stranger]))
    assert found.corrections == []
    assert "owner not known" in found.notes[0]
    # kvmeter's owner and CloudStack's disagree (a move kvmeter did not see): no correction.
    life = [*LIFE, usage("VM.STOP", 2, ALICE)]
    moved = vm("Running", owner="bob")
    found, _ = run(life, snap(5, VirtualMachines=[moved]), snap(3, VirtualMachines=[moved]))
    assert found.corrections == []


def test_an_unseen_vm_is_created_at_its_creation_time() -> None:
    seen = api.vm("vm-new", "x", "bob", "Stopped", "large", T0 + H)
    found, fixed = run([], snap(5, VirtualMachines=[seen]), snap(3, VirtualMachines=[seen]))
    assert [(c.event_type, c.time_ms, c.account, c.offering) for c in found.corrections] == [
        ("VM.CREATE", T0 + H, BOB, "large")
    ]
    assert build_history(fixed)["vm-new"].allocated[0].offering == "large"


def test_lost_ip_release_and_assign() -> None:
    held = [usage("NET.IPASSIGN", 0, ALICE, uuid=IP)]
    found, fixed = run(held, snap(5), snap(3))
    [c] = found.corrections
    assert (c.event_type, c.time_ms, c.account) == ("NET.IPRELEASE", T0 + 3 * H, ALICE)
    assert build_history(fixed)[IP].ip[0].end_ms == T0 + 3 * H
    assert_settled(fixed, snap(5), snap(3))
    listed = [api.public_ip(IP, "203.0.113.9", "bob", T0 + int(1.5 * H))]
    found, fixed = run([], snap(5, PublicIpAddresses=listed), snap(3, PublicIpAddresses=listed))
    [c] = found.corrections
    assert (c.event_type, c.time_ms, c.account, c.address) == (
        "NET.IPASSIGN",
        T0 + int(1.5 * H),
        BOB,
        "203.0.113.9",
    )
    assert build_history(fixed)[IP].ip[0].address == "203.0.113.9"


def test_router_is_billed_to_its_networks_owner() -> None:
    lists = {
        "Networks": [api.network("net-1", "alice-net", "alice"),
                     api.network("tier-1", "t1", "bob", vpc_id="vpc-1")],
        "Routers": [api.router(ROUTER, "r-5-VM", network_id="net-1", created_ms=T0),
                    api.router("router-vpc", "r-6-VM", vpc_id="vpc-1", created_ms=T0)],
    }  # fmt: skip
    found, fixed = run([], snap(5, **lists))
    assert [(c.resource_uuid, c.event_type, c.account, c.time_ms) for c in found.corrections] == [
        (ROUTER, "ROUTER.OWNER", ALICE, T0),
        ("router-vpc", "ROUTER.OWNER", BOB, T0),
    ]
    index = OwnerIndex(build_history(fixed))
    measure = Measure(
        "s", 1, 0, "h", T0 + H, T0 + H + 1, "sent", 10, 1, "public", ROUTER, "", "", "r-5-VM", "vnet3"
    )
    assert index.owner_at(measure) == ALICE
    assert_settled(fixed, snap(5, **lists), None)
    # The operator's file stays an override.
    assert OwnerIndex(build_history(fixed), routers={"r-5-VM": BOB}).owner_at(measure) == BOB
    # A network whose owner is not known for sure: no owner.
    unknown = {**lists, "Networks": [api.network("net-1", "n", "nobody-known")]}
    found, _ = run([], snap(5, **{**unknown, "Routers": lists["Routers"][:1]}))
    assert found.corrections == []


def test_scaled_vm_with_no_offering_on_the_bus() -> None:
    life = [
        usage("VM.CREATE", 0, ALICE, "small"),
        usage("VM.START", 1, ALICE),
        usage("VM.DYNAMIC.SCALE", 2, ALICE),
    ]
    before, now = (
        snap(3, VirtualMachines=[vm("Running", "large")]),
        snap(5, VirtualMachines=[vm("Running", "large")]),
    )
    found, fixed = run(life, now, before)
    [c] = found.corrections
    assert (c.event_type, c.time_ms, c.offering) == ("VM.DYNAMIC.SCALE", T0 + 2 * H, "large")
    assert c.details == ()  # a fixed offering: its size is the offering's, no size of its own
    history = build_history(fixed)[VM]
    assert [(s.offering, s.start_ms) for s in history.running] == [("small", T0 + H), ("large", T0 + 2 * H)]
    assert [(s.offering, s.start_ms) for s in history.allocated] == [("small", T0), ("large", T0 + 2 * H)]
    assert_settled(fixed, now, before)
    # No scaling event at all: the pass that first saw the new offering.
    found, _ = run(life[:2], now, snap(3, VirtualMachines=[vm("Running", "small")]))
    assert [c.time_ms for c in found.corrections] == [T0 + 5 * H]


def test_offering_learned_names_the_open_segments_from_their_start() -> None:
    unnamed = [usage("VM.CREATE", 0, ALICE), usage("VM.START", 1, ALICE)]
    found, fixed = run(unnamed, snap(5, VirtualMachines=[vm("Running", "small")]))
    assert [(c.event_type, c.time_ms) for c in found.corrections] == [("VM.DYNAMIC.SCALE", T0)]
    history = build_history(fixed)[VM]
    assert [(s.offering, s.start_ms) for s in history.allocated] == [("small", T0)]
    assert [(s.offering, s.start_ms) for s in history.running] == [("small", T0 + H)]


def test_corrections_are_deterministic() -> None:
    args = (LIFE, snap(5), snap(3))
    first, second = run(*args)[0], run(*args)[0]
    assert [c.event_id for c in first.corrections] == [c.event_id for c in second.corrections]
    assert first.corrections[0].event_id == parse_event(first.corrections[0].event_value()).event_id


def test_a_snapshot_missing_most_open_vms_is_refused() -> None:
    events = [usage("VM.START", 1, ALICE, uuid=f"vm-{i}") for i in range(6)]
    by: dict[str, list[pb.LifecycleEvent]] = {}
    for ev in events:
        by.setdefault(ev.resource_uuid, []).append(ev)
    with pytest.raises(SnapshotError, match="not listed"):
        reconcile(view_of(by, build_history(events)), snap(5), snap(3))


def test_nonsense_is_refused() -> None:
    bad = cloud()
    bad["listVirtualMachines"] = "nonsense"  # type: ignore[assignment]
    with pytest.raises(SnapshotError):
        parse_snapshot(bad, T0)
    worse = cloud(VirtualMachines=[{**vm("Running"), "cpunumber": "many"}])
    with pytest.raises(SnapshotError):
        parse_snapshot(worse, T0)


def test_observe_keeps_since_and_ignores_older_polls() -> None:
    class Batch:
        def __init__(self, at: int, state: int) -> None:
            self.poll_time_ms = at
            self.inventory = [pb.DomainInventory(uuid=VM, name="i-2-1-VM", state=state)]

    witness: dict[str, Witness] = {}
    observe(
        witness, [Batch(10, pb.RUNNING), Batch(20, pb.RUNNING), Batch(30, pb.SHUTOFF), Batch(25, pb.RUNNING)]
    )
    assert witness[VM] == Witness(running=False, since_ms=30, seen_ms=30)


def test_lost_create_takes_cloudstacks_creation_time() -> None:
    life = [usage("VM.START", 1, ALICE, "small")]  # the bus lost VM.CREATE at 0
    now, before = snap(5, VirtualMachines=[vm("Running")]), snap(3, VirtualMachines=[vm("Running")])
    found, fixed = run(life, now, before)
    assert [(c.event_type, c.time_ms, c.account) for c in found.corrections] == [("VM.CREATE", T0, ALICE)]
    history = build_history(fixed)[VM]
    assert [(s.start_ms, s.end_ms) for s in history.allocated] == [(T0, None)]
    assert_settled(fixed, now, before)
    # Destroyed and listed again (recovered): not before the destroy, at the previous pass.
    gone = [usage("VM.CREATE", 0, ALICE, "small"), usage("VM.DESTROY", 2, ALICE)]
    found, _ = run(gone, snap(5, VirtualMachines=[vm("Stopped")]), snap(3, VirtualMachines=[vm("Stopped")]))
    assert [(c.event_type, c.time_ms) for c in found.corrections] == [("VM.CREATE", T0 + 3 * H)]


def test_stale_agents_neither_dispute_nor_witness() -> None:
    now, before = snap(5, VirtualMachines=[vm("Stopped")]), snap(3, VirtualMachines=[vm("Stopped")])
    # A host that last reported the VM running hours ago (it died): CloudStack and the previous
    # pass decide.
    silent = {VM: Witness(running=True, since_ms=T0 + H, seen_ms=T0 + int(1.5 * H))}
    found, _ = run(LIFE, now, before, silent)
    assert [(c.event_type, c.time_ms) for c in found.corrections] == [("VM.STOP", T0 + 3 * H)]
    # "Not running" seen before the running segment opened is old news: not a witness.
    old = {VM: Witness(running=False, since_ms=T0 + int(0.5 * H), seen_ms=T0 + int(0.5 * H))}
    found, _ = run(LIFE, now, None, old)
    assert found.corrections == []
