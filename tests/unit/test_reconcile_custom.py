"""The reconciler and custom offerings: a VM whose cpunumber / memory CloudStack reports changed
with no offering change (scaleVirtualMachine on a custom offering, nothing on the bus) gets a
VM.DYNAMIC.SCALE naming its size, at the best known time, exactly as an offering change does."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from kvmeter.collector.cloudstack import parse_event
from kvmeter.collector.cs_snapshot import Snapshot, parse_snapshot
from kvmeter.collector.lifecycle import build_history
from kvmeter.collector.reconcile import Findings, reconcile, view_of
from kvmeter.proto import pb
from tests.harness import cloudstack_api as api
from tests.unit.cs_events import T0, H, action, finish, usage

ALICE, VM = "acct-a", "vm-1"


def snap(hours: float, cpu: int, memory: int, custom_vm: bool = True, offering: str = "custom") -> Snapshot:
    doc = api.empty_cloud()
    doc["listAccounts"] = [api.account(ALICE, "alice")]
    doc["listDomains"] = [api.domain()]
    doc["listServiceOfferings"] = [
        api.offering("custom", "Custom", None, None),
        api.offering("small", "S", 1, 512),
    ]
    build = api.custom_vm if custom_vm else api.vm
    doc["listVirtualMachines"] = [build(VM, "web-1", "alice", "Running", offering, T0, cpu, memory)]
    return parse_snapshot(doc, T0 + int(hours * H))


def sized(kind: str, hours: float, cpu: int, memory: int) -> pb.LifecycleEvent:
    ev = usage(kind, hours, ALICE, "custom")
    ev.attributes.update({"cpunumber": str(cpu), "memory": str(memory)})
    return finish(ev)


def run(
    events: Sequence[pb.LifecycleEvent], now: Snapshot, before: Snapshot | None = None
) -> tuple[Findings, list]:
    by_resource: dict[str, list[pb.LifecycleEvent]] = {}
    for ev in events:
        by_resource.setdefault(ev.resource_uuid, []).append(ev)
    found = reconcile(view_of(by_resource, build_history(events)), now, before)
    fixed = [parse_event(c.event_value(), c.resource_uuid.encode()) for c in found.corrections]
    return found, [*events, *fixed]


def running(events: Sequence[pb.LifecycleEvent]) -> list[tuple[str, float, Any]]:
    h = build_history(events)[VM]
    return [(s.size, (s.start_ms - T0) / H, s.end_ms and (s.end_ms - T0) / H) for s in h.running]


LIFE = [sized("VM.CREATE", 0, 1, 1024), sized("VM.START", 1, 1, 1024)]


@pytest.mark.parametrize(
    ("case", "extra", "before", "at_hours"),
    [
        ("a scaling event on the bus (no size): its time", [usage("VM.DYNAMIC.SCALE", 2, ALICE)], None, 2),
        ("scaleVirtualMachine's action event: its time", [action("VM.DYNAMIC.SCALE", 2.5)], None, 2.5),
        ("no event, the previous pass saw the new size: that pass", [], snap(3, 4, 8192), 3),
        ("no event, the previous pass saw the old size: this pass", [], snap(3, 1, 1024), 5),
    ],
)
def test_a_size_change_splits_at_the_best_known_time(
    case: str, extra: list, before: Snapshot | None, at_hours: float
) -> None:
    now = snap(5, 4, 8192)
    found, fixed = run([*LIFE, *extra], now, before)
    [c] = found.corrections
    assert (c.event_type, c.offering, c.time_ms) == ("VM.DYNAMIC.SCALE", "custom", T0 + int(at_hours * H)), (
        case
    )
    assert dict(c.details) == {"cpunumber": "4", "memory": "8192"}
    assert "scaled from 1/1024 to 4/8192" in c.reason
    assert running(fixed) == [("1/1024", 1, at_hours), ("4/8192", at_hours, None)]
    again, _ = run(fixed, now, before)
    assert again.corrections == []  # settled


def test_a_size_never_named_is_learned_from_the_segments_start() -> None:
    bare = [usage("VM.CREATE", 0, ALICE, "custom"), usage("VM.START", 1, ALICE)]
    found, fixed = run(bare, snap(5, 2, 4096))
    [c] = found.corrections
    assert (c.time_ms, dict(c.details)) == (T0, {"cpunumber": "2", "memory": "4096"})
    assert running(fixed) == [("2/4096", 1, None)]
    assert run(fixed, snap(5, 2, 4096))[0].corrections == []


def test_custom_by_the_offering_alone_and_fixed_offerings_name_no_size() -> None:
    # The VM's details missing, the offering customized (no cpunumber / memory): still custom.
    found, _ = run(LIFE, snap(5, 4, 8192, custom_vm=False), snap(3, 4, 8192, custom_vm=False))
    assert [dict(c.details) for c in found.corrections] == [{"cpunumber": "4", "memory": "8192"}]
    # A fixed offering: a cpunumber / memory differing from the segments' says nothing.
    fixed = [usage("VM.CREATE", 0, ALICE, "small"), usage("VM.START", 1, ALICE)]
    assert run(fixed, snap(5, 4, 8192, custom_vm=False, offering="small"))[0].corrections == []
