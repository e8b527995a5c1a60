"""Builders of normalised CloudStack lifecycle events for the collector's unit tests."""

from __future__ import annotations

import hashlib

from hypothesis import strategies as st

from kvmeter.proto import pb

H = 3_600_000
T0 = 1_715_680_800_000  # 2024-05-14T10:00:00Z
VM = "vm-1"
A = "acct-a"
B = "acct-b"
ADMIN = "acct-admin"


def finish(ev: pb.LifecycleEvent) -> pb.LifecycleEvent:
    """Give the event a content digest as its id, as parse_event does for raw values."""
    ev.event_id = hashlib.sha256(ev.SerializeToString(deterministic=True)).hexdigest()
    return ev


def usage(kind: str, hours: float, account: str = A, offering: str = "", uuid: str = VM) -> pb.LifecycleEvent:
    rtype = "IpAddress" if kind.startswith("NET.") else "VirtualMachine"
    ev = pb.LifecycleEvent(category=pb.USAGE, event_type=kind, resource_type=rtype, resource_uuid=uuid)
    ev.account_uuid, ev.account_is_owner, ev.time = account, True, T0 + int(hours * H)
    if offering:
        ev.offering_uuid = offering
    return finish(ev)


def state(
    old: str,
    new: str,
    hours: float,
    status: str = "postStateTransitionEvent",
    uuid: str = VM,
    resource_type: str = "VirtualMachine",
) -> pb.LifecycleEvent:
    ev = pb.LifecycleEvent(
        category=pb.RESOURCE_STATE, event_type="StateTransition", resource_type=resource_type
    )
    ev.resource_uuid, ev.time, ev.status = uuid, T0 + int(hours * H), status
    ev.attributes["old-state"], ev.attributes["new-state"] = old, new
    return finish(ev)


def action(kind: str, hours: float, account: str = ADMIN, uuid: str = VM) -> pb.LifecycleEvent:
    ev = pb.LifecycleEvent(
        category=pb.ACTION, event_type=kind, resource_type="VirtualMachine", resource_uuid=uuid
    )
    ev.account_uuid, ev.time, ev.status = account, T0 + int(hours * H), "Completed"
    return finish(ev)


VM_KINDS = ["VM.CREATE", "VM.START", "VM.STOP", "VM.UPGRADE", "VM.DYNAMIC.SCALE", "VM.DESTROY"]
# Post-transition state events of a VM: stop, start, power-off, HA, migration, failure.
VM_TRANSITIONS = [
    ("Running", "Stopping"),
    ("Stopping", "Stopped"),
    ("Stopped", "Starting"),
    ("Starting", "Running"),
    ("Running", "Stopped"),
    ("Running", "Migrating"),
    ("Migrating", "Running"),
    ("Running", "Error"),
]


@st.composite
def vm_events(draw: st.DrawFn) -> list[pb.LifecycleEvent]:
    """Lifecycle events of one VM (and one IP) at a few instants, so that many share one
    (CloudStack stamps whole seconds: a start and a stop often do)."""
    instants = draw(st.lists(st.integers(0, 12), min_size=1, max_size=6, unique=True))
    events = []
    for _ in range(draw(st.integers(0, 14))):
        hours = draw(st.sampled_from(instants)) / 2
        pick = draw(st.integers(0, 6))
        if pick == 5:  # an IP address of the same owners, interleaved
            kind = draw(st.sampled_from(["NET.IPASSIGN", "NET.IPRELEASE"]))
            events.append(usage(kind, hours, draw(st.sampled_from([A, B])), uuid="ip-1"))
        elif pick == 6:  # the caller's audit trail: changes nothing
            events.append(action(draw(st.sampled_from(VM_KINDS)), hours))
        elif pick == 0:
            old, new = draw(st.sampled_from(VM_TRANSITIONS))
            events.append(state(old, new, hours))
        else:
            kind = draw(st.sampled_from(VM_KINDS))
            account = draw(st.sampled_from([A, B]))
            events.append(usage(kind, hours, account, draw(st.sampled_from(["", "small", "large"]))))
    return events
