"""Custom offerings: a VM whose vCPUs or memory change without an offering change
(scaleVirtualMachine with details cpuNumber / memory; VM.UPGRADE / VM.DYNAMIC.SCALE) splits
RUNNING / ALLOCATED at the event's time, exactly as an offering change does, and its usage
records carry the size it ran with (detail "cpu/memory")."""

from __future__ import annotations

import json

import pytest

from kvmeter.collector.cloudstack import parse_event
from kvmeter.collector.lifecycle import build_resource_history
from kvmeter.collector.model import ALLOCATED_VM, RUNNING_VM
from kvmeter.collector.usage import time_usage
from kvmeter.collector.vm_size import parse_size, size_of, size_text
from kvmeter.proto import pb
from tests.unit.cs_events import T0, VM, A, H, finish, usage

CUSTOM, FIXED = "off-custom", "off-fixed"


def sized(kind: str, hours: float, cpu: int, memory: int, offering: str = CUSTOM) -> pb.LifecycleEvent:
    """A usage event naming the VM's own size (as the reconciler's corrections do)."""
    ev = usage(kind, hours, A, offering)
    ev.attributes.update({"cpunumber": str(cpu), "memory": str(memory)})
    return finish(ev)


def job(kind: str, cpu: int, memory: int, offering: str = CUSTOM) -> pb.LifecycleEvent:
    """A completed async job as ApiServer publishes it: the UserVmResponse under its response
    name, a custom offering's VM with its own size in `details` (no time)."""
    vm = {"id": VM, "serviceofferingid": offering, "cpunumber": cpu, "memory": memory,
          "details": {"cpuNumber": str(cpu), "cpuSpeed": "1000", "memory": str(memory)}}  # fmt: skip
    doc = {"account": A, "instanceUuid": VM, "instanceType": "VirtualMachine", "commandEventType": kind,
           "jobId": f"job-{kind}-{cpu}-{memory}", "jobResult": {"virtualmachine": vm},
           "status": "SUCCEEDED"}  # fmt: skip
    return parse_event(json.dumps(doc).encode())


def shapes(segments: list) -> list[tuple[str, str, int, int | None]]:
    return [
        (
            s.offering,
            s.size,
            (s.start_ms - T0) // (H // 4),
            None if s.end_ms is None else (s.end_ms - T0) // (H // 4),
        )
        for s in segments
    ]


# (case, events, RUNNING, ALLOCATED) -- times in quarter hours
CASES = [
    (
        "dynamic scale while running splits both at its time",
        [sized("VM.CREATE", 0, 1, 1024), usage("VM.START", 0.25), sized("VM.DYNAMIC.SCALE", 1, 4, 8192)],
        [(CUSTOM, "1/1024", 1, 4), (CUSTOM, "4/8192", 4, None)],
        [(CUSTOM, "1/1024", 0, 4), (CUSTOM, "4/8192", 4, None)],
    ),
    (
        "upgrade while stopped splits ALLOCATED; the next start runs at the new size",
        [sized("VM.CREATE", 0, 1, 1024), usage("VM.START", 0.25), usage("VM.STOP", 0.5),
         sized("VM.UPGRADE", 1, 2, 2048), usage("VM.START", 1.5)],
        [(CUSTOM, "1/1024", 1, 2), (CUSTOM, "2/2048", 6, None)],
        [(CUSTOM, "1/1024", 0, 4), (CUSTOM, "2/2048", 4, None)],
    ),
    (
        "the same size again splits nothing",
        [sized("VM.CREATE", 0, 2, 2048), usage("VM.START", 0.25), sized("VM.DYNAMIC.SCALE", 1, 2, 2048)],
        [(CUSTOM, "2/2048", 1, None)],
        [(CUSTOM, "2/2048", 0, None)],
    ),
    (
        "a size change and an offering change at once: one split",
        [sized("VM.CREATE", 0, 1, 1024), usage("VM.START", 0.25), usage("VM.DYNAMIC.SCALE", 1, A, FIXED)],
        [(CUSTOM, "1/1024", 1, 4), (FIXED, "", 4, None)],  # a fixed offering: its size is the offering's
        [(CUSTOM, "1/1024", 0, 4), (FIXED, "", 4, None)],
    ),
    (
        "the bus: a bare scale usage event takes the scale job's size (jobResult details)",
        [job("VM.CREATE", 1, 1024), usage("VM.CREATE", 0, A), usage("VM.START", 0.25),
         usage("VM.DYNAMIC.SCALE", 1, A), job("VM.DYNAMIC.SCALE", 4, 8192)],
        [(CUSTOM, "1/1024", 1, 4), (CUSTOM, "4/8192", 4, None)],
        [(CUSTOM, "1/1024", 0, 4), (CUSTOM, "4/8192", 4, None)],
    ),
    (
        "a fixed offering's job names no size (no details)",
        [usage("VM.CREATE", 0, A, FIXED), usage("VM.START", 0.25)],
        [(FIXED, "", 1, None)],
        [(FIXED, "", 0, None)],
    ),
    (
        "a restart keeps the size (events naming neither inherit both)",
        [sized("VM.CREATE", 0, 2, 4096), usage("VM.START", 0.25), usage("VM.STOP", 0.5),
         usage("VM.START", 0.75)],
        [(CUSTOM, "2/4096", 1, 2), (CUSTOM, "2/4096", 3, None)],
        [(CUSTOM, "2/4096", 0, None)],
    ),
]  # fmt: skip


@pytest.mark.parametrize(("case", "events", "running", "allocated"), CASES, ids=[c[0] for c in CASES])
def test_custom_offering_table(case: str, events: list, running: list, allocated: list) -> None:
    for order in (events, events[::-1]):  # arrival order never matters
        h = build_resource_history(VM, order)
        assert shapes(h.running) == running, case
        assert shapes(h.allocated) == allocated, case


def test_a_scale_inside_a_window_gives_two_records_of_that_window() -> None:
    events = [
        sized("VM.CREATE", 0, 1, 1024),
        sized("VM.START", 0, 1, 1024),
        sized("VM.DYNAMIC.SCALE", 0.25, 4, 8192),
    ]
    records = time_usage(build_resource_history(VM, events), T0 + H, H)
    got = {(v.key.usage_type, v.key.offering, v.key.detail): v.quantity_ms for v in records}
    assert got == {
        (RUNNING_VM, CUSTOM, "1/1024"): H // 4,
        (RUNNING_VM, CUSTOM, "4/8192"): 3 * H // 4,
        (ALLOCATED_VM, CUSTOM, "1/1024"): H // 4,
        (ALLOCATED_VM, CUSTOM, "4/8192"): 3 * H // 4,
    }


def test_sizes() -> None:
    assert size_text(2, 2048) == "2/2048"
    assert size_text(None, 2048) == size_text(2, 0) == ""
    assert parse_size("2/2048") == (2, 2048)
    assert parse_size("") is parse_size("public") is parse_size("2/x") is None
    assert size_of({"cpuNumber": "4", "memory": "8192"}) == "4/8192"
    assert size_of({"cpunumber": "4"}) == size_of({"cpunumber": "-1", "memory": "1"}) == ""
    assert (
        size_of({"details.cpuNumber": "1", "details.memory": "512", "cpunumber": "9"}, "details.") == "1/512"
    )
