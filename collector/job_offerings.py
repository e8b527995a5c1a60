"""Offerings and sizes from CloudStack's async jobs (their jobResult is the VM as the API returned
it, with no time) given to the usage events that have the time and neither: a VM's first from
its completed VM.CREATE job, a scaling usage event's (VM.UPGRADE / VM.DYNAMIC.SCALE) from a
completed scaling job, where the pairing is unambiguous or the delivery order of one source
makes it so. A part of lifecycle.py's rules, pure."""

from __future__ import annotations

from kvmeter.collector.vm_size import size_of
from kvmeter.proto import pb

_SCALING = frozenset({"VM.UPGRADE", "VM.DYNAMIC.SCALE"})
JOB_DONE = "SUCCEEDED"  # JobInfo.Status of a completed async job


def with_job_offerings(events: list[pb.LifecycleEvent]) -> tuple[tuple[str, str], list[pb.LifecycleEvent]]:
    """The VM's offering and size at creation and its events, a scaling usage event given the
    offering and size (cpunumber / memory) a completed scaling job named. Async jobs carry the VM
    as the API returned it (offering, size, no time); usage events the time (neither): paired
    only where that is unambiguous."""
    done = [ev for ev in events if ev.category == pb.ASYNC_JOB and ev.status == JOB_DONE and ev.offering_uuid]
    # A job result's VM has its own size in its details only on a custom offering.
    created = {
        (ev.offering_uuid, size_of(ev.attributes, "details.")) for ev in done if ev.event_type == "VM.CREATE"
    }
    scaled = {
        (ev.offering_uuid, size_of(ev.attributes, "details.")) for ev in done if ev.event_type in _SCALING
    }
    bare = [
        ev for ev in events if ev.category == pb.USAGE and ev.event_type in _SCALING and not ev.offering_uuid
    ]
    pairs: dict[int, tuple[str, str]] = {}
    if len(scaled) == 1 and len(bare) == 1:
        pairs[id(bare[0])] = scaled.pop()
    else:
        jobs = [ev for ev in done if ev.event_type in _SCALING]
        pairs = _paired_in_delivery_order(bare, jobs)
    named_events: dict[int, pb.LifecycleEvent] = {}
    for ev in bare:
        if id(ev) not in pairs:
            continue
        named = pb.LifecycleEvent()
        named.CopyFrom(ev)
        named.offering_uuid, size = pairs[id(ev)]
        if size:
            cpu, memory = size.split("/")
            named.attributes.update({"cpunumber": cpu, "memory": memory})
        named_events[id(ev)] = named
    if named_events:
        events = [named_events.get(id(ev), ev) for ev in events]
    return (created.pop() if len(created) == 1 else ("", "")), events


def _paired_in_delivery_order(
    bare: list[pb.LifecycleEvent], jobs: list[pb.LifecycleEvent]
) -> dict[int, tuple[str, str]]:
    """id(bare scaling usage event) -> (offering, size) of the scaling job that completed after
    it, when all of them came by one source that keeps its order (a Kafka partition: the bus
    keys by the VM's uuid; a RabbitMQ stream; a file): a job completes after the usage event
    its command published, before the next command's; it names every bare event since the job
    before it. Types are not matched: ScaleVMCmd's event type is VM.UPGRADE, its usage event
    VM.DYNAMIC.SCALE when the VM runs, published twice (UserVmManagerImpl.upgradeVirtualMachine
    and VirtualMachineManagerImpl.orchestrateReConfigureVm)."""
    both = [*bare, *jobs]
    if not bare or not jobs or len({ev.delivery_source for ev in both}) != 1 or not both[0].delivery_source:
        return {}
    placed = sorted(both, key=lambda ev: (ev.delivery_seq, ev.category != pb.USAGE))
    pairs: dict[int, tuple[str, str]] = {}
    pending: list[pb.LifecycleEvent] = []
    for ev in placed:
        if ev.category == pb.USAGE:
            pending.append(ev)
        else:  # any scaling job: scaleVirtualMachine's is VM.UPGRADE for both usage types
            for bare_ev in pending:
                pairs[id(bare_ev)] = (ev.offering_uuid, size_of(ev.attributes, "details."))
            pending = []
    return pairs
