"""VMs hidden from their owner (`displayvm=false`): the VM usage events CloudStack published on
the bus but did not save, so its usage server bills none of them. A part of lifecycle.py's
rules, pure.

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
starts are told by their own jobs, below. Resource-state events of the VM in the window
change nothing either: their transition to Running would open RUNNING under the default
policy (and under running = "state"), and CloudStack bills none of it.

Later: startVirtualMachine, stopVirtualMachine, destroyVirtualMachine, scaleVirtualMachine ...
are async jobs whose result is the VM too, `displayvm` with it. A completed one that names the
VM hidden says it was hidden since its last VM.CREATE / VM.DESTROY usage event delivered before
the job: hiding or showing a VM that is not destroyed publishes one of them (UserVmManagerImpl
.saveUsageEvent: VM.DESTROY, plus VM.STOP when it runs, on hiding; VM.CREATE, plus VM.START, on
showing), and a destroyed VM starts again only after a recover (VM.CREATE) or a backup restore
(no usage event, the flag kept). So the openers of that stretch (a VM.START, a state event to
Running, and a VM.CREATE that begins it: a recover while hidden, as a saved one shows the VM)
were not saved; a VM.DESTROY that begins it may be the hide itself, saved, and stays. A
destroyVirtualMachine job naming the VM hidden published its own VM.DESTROY while hidden, not
saved: the stretch that one ended, since the job before, was hidden too (an HA start). A job
naming the VM displayed ends a stretch too (a hide lost on the way bills no visible time
away). Jobs have no time, so stretches are placed by the delivery order of the one source that
delivered all the VM's bus events (a Kafka partition: the bus keys jobs, usage and state events
by the VM's uuid; a RabbitMQ stream; a file); else nothing is left out here. A hidden start
no job tells (HA, out of band) or a recover is dropped after the fact by its next job while
still hidden; until then, or without one (a hidden VM recovered and left stopped; a VM hidden
while running under running = "state"), it is the reconciler's (reconcile.py `_hidden`)."""

from __future__ import annotations

from kvmeter.collector.job_offerings import JOB_DONE
from kvmeter.collector.lifecycle_order import RUNNING_STATE
from kvmeter.proto import pb

HIDDEN = "false"  # cloudstack.py writes the jobResult VM's displayvm as "true" / "false"
_OURS = frozenset({"VM.EXPUNGE"})  # the reconciler's own usage-shaped events: never CloudStack's


def unsaved_at_deploy(events: list[pb.LifecycleEvent]) -> set[int]:
    """id() of the VM usage and resource-state events of a VM deployed hidden that CloudStack did
    not save (or bill): those before its second VM.CREATE (the one showing it), all of them while
    it never was shown."""
    if not any(_hidden_job(ev) and ev.event_type == "VM.CREATE" for ev in events):
        return set()
    vm_events = [ev for ev in events if _vm_event(ev)]
    creates = sorted(
        {ev.time for ev in vm_events if ev.category == pb.USAGE and ev.event_type == "VM.CREATE"}
    )
    shown = creates[1] if len(creates) > 1 else None  # the deploy's is the first
    return {id(ev) for ev in vm_events if shown is None or ev.time < shown}


def unsaved_before_hidden_jobs(events: list[pb.LifecycleEvent]) -> set[int]:
    """id() of the openers (VM.CREATE, VM.START, a state event to Running) CloudStack did not
    save, told by the completed jobs naming the VM hidden: each job's stretch (the module doc),
    when one source delivered all the VM's bus events. Events of no source (the reconciler's
    corrections) cannot be placed, and bound nothing."""
    if not any(_hidden_job(ev) for ev in events):
        return set()
    placed = [ev for ev in events if ev.delivery_source and (_vm_event(ev) or ev.category == pb.ASYNC_JOB)]
    if len({ev.delivery_source for ev in placed}) != 1:
        return set()
    placed.sort(key=lambda ev: ev.delivery_seq)
    unsaved: set[int] = set()
    stretch: list[int] = []  # id() of the openers since the last VM.CREATE / VM.DESTROY
    ended: list[int] = []  # the stretch a VM.DESTROY since the last completed job ended
    for ev in placed:
        usage = ev.event_type if ev.category == pb.USAGE else ""
        if usage == "VM.DESTROY":
            ended, stretch = stretch, []  # maybe the hide itself (saved: it closes what was open)
        elif _job_names(ev, "true"):
            stretch = []  # a lost hide
        elif usage == "VM.CREATE":
            stretch = [id(ev)]  # a recover while hidden if a hidden job follows: a saved one shows it
        elif usage == "VM.START" or (
            ev.category == pb.RESOURCE_STATE and ev.attributes.get("new-state") == RUNNING_STATE
        ):
            stretch.append(id(ev))
        elif _hidden_job(ev):
            unsaved.update(stretch)
            if ev.event_type == "VM.DESTROY":  # its own VM.DESTROY, published hidden, is not saved:
                unsaved.update(ended)  # the stretch that one ended was hidden too (an HA start)
        if ev.category == pb.ASYNC_JOB and ev.status == JOB_DONE:
            ended = []
    return unsaved


def _hidden_job(ev: pb.LifecycleEvent) -> bool:
    return _job_names(ev, HIDDEN)


def _job_names(ev: pb.LifecycleEvent, display: str) -> bool:
    """A completed job whose result is the VM with this display flag."""
    return ev.category == pb.ASYNC_JOB and ev.status == JOB_DONE and ev.attributes.get("displayvm") == display


def _vm_event(ev: pb.LifecycleEvent) -> bool:
    """A VM usage event CloudStack publishes, or a resource-state event."""
    if ev.category == pb.RESOURCE_STATE:
        return True
    return ev.category == pb.USAGE and ev.event_type.startswith("VM.") and ev.event_type not in _OURS
