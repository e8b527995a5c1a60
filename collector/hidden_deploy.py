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
are async jobs whose result is the VM too, `displayvm` with it. Hiding or showing a VM that is
not destroyed publishes (and saves) VM.DESTROY, plus VM.STOP when it runs, on hiding; VM.CREATE,
plus VM.START, on showing (UserVmManagerImpl.saveUsageEvent; nothing for a destroyed VM), and a
destroyed VM starts again only after a recover (VM.CREATE) or a backup restore (no usage event).
The bus is lossy, so an opener (a VM.START, a state event to Running, a recover's VM.CREATE) is
left out only when it is provably hidden, walking the VM's events in delivery order:
- a start after a sign of hiding (a VM.DESTROY: a hide, or a destroy, which only a recover's
  VM.CREATE undoes; a completed job naming the VM hidden), none of display since (a job naming
  it displayed, a show's VM.CREATE);
- a recover's VM.CREATE (one after a destroy job or a state event to Destroyed) after a job
  naming the VM hidden with no updateVirtualMachine since (its action event VM.UPDATE: showing a
  destroyed VM publishes no usage event), or before one with no VM.UPDATE nor VM.DESTROY
  between (but a hidden destroy job's own) (hiding a destroyed VM publishes no usage event; a
  hide after the recover, both); a recover (its VM.CREATE or its state event Destroyed
  -> Stopped, whichever came) ends a VM.DESTROY's sign of hiding unless such a job says hidden;
- a startVirtualMachine job's own start (its openers since the last closer) when it names the
  VM hidden;
- and not one of them when a job naming the VM displayed follows before a show: that says a
  show was lost on the way, and the openers may have been visible.
A show's VM.CREATE says the VM was hidden until then. A lost hide leaves the starts before the
next sign of hiding billed, not a visible hour left out: the reconciler's (reconcile.py
`_hidden`), as is a hidden VM whose signs were all lost or came from several sources. Jobs have
no time, so all this is placed by the delivery order of the one source that delivered all the
VM's bus events (a Kafka partition: the bus keys jobs, usage, state and action events by the
VM's uuid; a RabbitMQ stream; a file); else nothing is left out here."""

from __future__ import annotations

from kvmeter.collector.job_offerings import JOB_DONE
from kvmeter.collector.lifecycle_order import RUNNING_STATE, STOPPED_STATES
from kvmeter.proto import pb

HIDDEN = "false"  # cloudstack.py writes the jobResult VM's displayvm as "true" / "false"
_OURS = frozenset({"VM.EXPUNGE"})  # the reconciler's own usage-shaped events: never CloudStack's
_BEFORE_OWN = frozenset({"VM.CREATE", "VM.STOP", "VM.DESTROY"})  # a start job's own openers follow


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
    save, those provably hidden (the module doc), when one source delivered all the VM's bus
    events. Events of no source (the reconciler's corrections) cannot be placed, and bound
    nothing."""
    if not any(_hidden_job(ev) or _usage(ev) == "VM.DESTROY" for ev in events):
        return set()
    placed = [ev for ev in events if ev.delivery_source and (_vm_event(ev) or ev.category == pb.ASYNC_JOB)]
    if len({ev.delivery_source for ev in placed}) != 1:
        return set()
    source = placed[0].delivery_source
    placed += [ev for ev in events if _update(ev) and ev.delivery_source == source]  # of that order only
    placed.sort(key=lambda ev: ev.delivery_seq)
    unsaved: set[int] = set()
    pending: list[int] = []  # id() of the openers after a sign of hiding, none of display since
    own: list[int] = []  # id() of the openers since the last closer or job: a start job's own
    hid = False  # a VM.DESTROY or a hidden job since the last sign of display: starts are hidden
    hid_job = False  # a hidden job since then, no update since: a recover is hidden too
    destroyed = False  # a destroy job or a state event to Destroyed since the last VM.CREATE
    # A recover's VM.CREATE, no update since: a hidden job after no VM.DESTROY (a hidden destroy
    # job: its own alone) says it was hidden (a hide after the recover would have published both
    # a VM.DESTROY and an update; one hidden while destroyed publishes no usage event)
    recovered: list[int] = []
    destroys = 0  # VM.DESTROYs since that recover
    for ev in placed:
        usage = _usage(ev)
        new_state = ev.attributes.get("new-state", "") if ev.category == pb.RESOURCE_STATE else ""
        if usage == "VM.CREATE" and not destroyed:  # a show (or the deploy): hidden until now
            unsaved.update(pending)
            pending, hid, hid_job = [], False, False
        elif usage == "VM.CREATE":  # a recover: the display flag is what it was
            pending += [id(ev)] if hid_job else []
            recovered, destroys = ([] if hid_job else [id(ev)]), 0
            hid = hid_job
        elif usage == "VM.START" or new_state == RUNNING_STATE:
            own.append(id(ev))
            pending += [id(ev)] if hid else []
        elif usage == "VM.DESTROY":  # a hide, or a destroy: a start after it, no recover between, is hidden
            hid, destroys = True, destroys + 1
        elif ev.attributes.get("old-state") == "Destroyed" and new_state == "Stopped":
            hid = hid_job  # a recover, its VM.CREATE delivered or not: the flag is what it was
        elif _update(ev):  # it may have shown a destroyed VM, which publishes no usage event
            hid_job, recovered = False, []
        elif _job_names(ev, "true"):  # a show lost on the way: what was pending may have been visible
            pending, hid, hid_job, recovered = [], False, False, []
        elif _hidden_job(ev):
            hid = hid_job = True
            if destroys <= (1 if ev.event_type == "VM.DESTROY" else 0):
                unsaved.update(recovered)
            recovered = []
            if ev.event_type == "VM.START":
                unsaved.update(own)
        if usage == "VM.CREATE":
            destroyed = False
        elif new_state == "Destroyed" or _job_done(ev, "VM.DESTROY"):
            destroyed = True
        if usage in _BEFORE_OWN or new_state in STOPPED_STATES or _job_done(ev, ""):
            own = []
    return unsaved | set(pending)


def _usage(ev: pb.LifecycleEvent) -> str:
    return ev.event_type if ev.category == pb.USAGE else ""


def _hidden_job(ev: pb.LifecycleEvent) -> bool:
    return _job_names(ev, HIDDEN)


def _job_names(ev: pb.LifecycleEvent, display: str) -> bool:
    """A completed job whose result is the VM with this display flag."""
    return _job_done(ev, "") and ev.attributes.get("displayvm") == display


def _job_done(ev: pb.LifecycleEvent, kind: str) -> bool:
    """A completed job of this command event type ("": any)."""
    return ev.category == pb.ASYNC_JOB and ev.status == JOB_DONE and kind in ("", ev.event_type)


def _update(ev: pb.LifecycleEvent) -> bool:
    """updateVirtualMachine done (its action event: it says not what it changed)."""
    return ev.category == pb.ACTION and ev.event_type == "VM.UPDATE" and ev.status == "Completed"


def _vm_event(ev: pb.LifecycleEvent) -> bool:
    """A VM usage event CloudStack publishes, or a resource-state event."""
    if ev.category == pb.RESOURCE_STATE:
        return True
    return ev.category == pb.USAGE and ev.event_type.startswith("VM.") and ev.event_type not in _OURS
