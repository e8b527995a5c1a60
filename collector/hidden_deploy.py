"""A VM deployed hidden (`displayvm=false`): the VM usage events CloudStack published on the bus
but did not save, so its usage server bills none of them. A part of lifecycle.py's rules, pure.

CloudStack's bus says a VM is hidden in one place only: an async job's jobResult is the VM as
the API returned it, and UserVmJoinDaoImpl.newUserVmResponse always sets its `displayvm` (the
stored result is serialised by ApiGsonHelper, no role filter). Usage events carry no display
flag (UsageEventUtils.publishUsageEvent publishes whatever displayResource is, saves only when
true), nor do action events (ActionEventUtils.publishOnEventBus). So a completed deploy job
(commandEventType VM.CREATE) whose VM has `displayvm` false says exactly that the deploy's
VM.CREATE, and every VM usage event until the VM is shown, were not saved. Showing it
(updateVirtualMachine displayvm=true) publishes and saves VM.CREATE (and VM.START when it
runs), which is where CloudStack starts billing: the next VM.CREATE ends the window. A VM
hidden later (its flip publishes and saves VM.STOP / VM.DESTROY) has no such job: its hidden
starts are the reconciler's to close (reconcile.py `_hidden`), as is anything the window here
misses (a lost deploy job, a recover while still hidden)."""

from __future__ import annotations

from kvmeter.collector.job_offerings import JOB_DONE
from kvmeter.proto import pb

HIDDEN = "false"  # cloudstack.py writes the jobResult VM's displayvm as "true" / "false"
_OURS = frozenset({"VM.EXPUNGE"})  # the reconciler's own usage-shaped events: never CloudStack's


def unsaved_at_deploy(events: list[pb.LifecycleEvent]) -> set[int]:
    """id() of the VM usage events of a VM deployed hidden that CloudStack did not save: those
    before its second VM.CREATE (the one showing it), all of them while it never was shown."""
    deployed_hidden = any(
        ev.category == pb.ASYNC_JOB
        and ev.status == JOB_DONE
        and ev.event_type == "VM.CREATE"
        and ev.attributes.get("displayvm") == HIDDEN
        for ev in events
    )
    if not deployed_hidden:
        return set()
    vm_usage = [
        ev
        for ev in events
        if ev.category == pb.USAGE and ev.event_type.startswith("VM.") and ev.event_type not in _OURS
    ]
    creates = sorted({ev.time for ev in vm_usage if ev.event_type == "VM.CREATE"})
    shown = creates[1] if len(creates) > 1 else None  # the deploy's is the first
    return {id(ev) for ev in vm_usage if shown is None or ev.time < shown}
