"""VMs hidden from their owner (displayvm=false) beyond the deploy job: their bus events as
CloudStack writes them, in the order one Kafka partition delivers them (the bus keys usage,
resource-state and async-job events by the VM's uuid), through the real Collector and store.

What CloudStack publishes (apache/cloudstack):
- updateVirtualMachine is a synchronous command (UpdateVMCmd extends BaseCustomIdCmd): no job,
  an action event VM.UPDATE without the flag. updateDisplayVmFlag -> saveUsageEvent publishes
  and saves (isDisplay true) VM.DESTROY, plus VM.STOP when the VM runs, on hiding; VM.CREATE,
  plus VM.START, on showing.
- While hidden, UserVmStateListener publishes the VM's usage events with its display flag
  (published, not saved) and its resource-state events (publish.resource.state.events, on by
  default) with none.
- startVirtualMachine / stopVirtualMachine / destroyVirtualMachine are async jobs whose result
  is the VM (UserVmResponse, `displayvm`); recoverVirtualMachine is synchronous (RecoverVMCmd
  extends BaseCmd), its usage event VM.CREATE (Destroyed -> Stopped) saved only when shown."""

from __future__ import annotations

import json
from pathlib import Path

from kvmeter.collector import config
from kvmeter.collector.model import ALLOCATED_VM, RUNNING_VM, Record, Settings
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store
from tests.collector_support import ACCT_A, HOUR, T0, VM1, Clock, cs_time, usage_event

PARTITION = "cloudstack/0"
JOB_COMMANDS = {
    "VM.CREATE": "DeployVMCmd",
    "VM.START": "StartVMCmd",
    "VM.STOP": "StopVMCmd",
    "VM.DESTROY": "DestroyVMCmd",
}


def _usage(kind: str, at_ms: int) -> bytes:
    return usage_event(kind, VM1, ACCT_A, at_ms)[1]


def _state(old: str, new: str, at_ms: int) -> bytes:
    """UserVmStateListener.pubishOnEventBus: resource, id, old-state, new-state, status, date."""
    doc = {"resource": "VirtualMachine", "id": VM1, "old-state": old, "new-state": new,
           "status": "postStateTransitionEvent", "eventDateTime": cs_time(at_ms)}  # fmt: skip
    return json.dumps(doc).encode()


def _action(kind: str, at_ms: int, description: str) -> bytes:
    """ActionEventUtils.publishOnEventBus, Completed: no display flag."""
    doc = {"eventDateTime": cs_time(at_ms), "status": "Completed", "event": kind, "entity": "VirtualMachine",
           "entityuuid": VM1, "account": ACCT_A, "user": "u-1", "VirtualMachine": VM1,
           "description": description}  # fmt: skip
    return json.dumps(doc).encode()


def _job(kind: str, display: bool, state: str) -> bytes:
    """A completed VM job (ApiServer's async-job event keys, no date), its result the VM as the
    command returned it, `displayvm` included (UserVmJoinDaoImpl.newUserVmResponse)."""
    vm = {"id": VM1, "name": "web-1", "serviceofferingid": "small", "displayvm": display, "state": state}
    doc = {"command": f"org.apache.cloudstack.api.command.user.vm.{JOB_COMMANDS[kind]}", "user": "u-1",
           "account": ACCT_A, "processStatus": "0", "resultCode": "0", "instanceUuid": VM1,
           "instanceType": "VirtualMachine", "commandEventType": kind, "jobId": f"job-{kind}-{state}",
           "jobResult": {"virtualmachine": vm}, "status": "SUCCEEDED"}  # fmt: skip
    return json.dumps(doc).encode()


def _deploy(at_ms: int, *, display: bool) -> list[bytes]:
    return [
        _usage("VM.CREATE", at_ms),
        _state("Stopped", "Starting", at_ms),
        _state("Starting", "Running", at_ms),
        _usage("VM.START", at_ms),
        _job("VM.CREATE", display, "Running"),
    ]


def _stop(at_ms: int, *, display: bool) -> list[bytes]:
    return [
        _state("Running", "Stopping", at_ms),
        _state("Stopping", "Stopped", at_ms),
        _usage("VM.STOP", at_ms),
        _job("VM.STOP", display, "Stopped"),
    ]


def _start(at_ms: int, *, display: bool) -> list[bytes]:
    return [
        _state("Stopped", "Starting", at_ms),
        _state("Starting", "Running", at_ms),
        _usage("VM.START", at_ms),
        _job("VM.START", display, "Running"),
    ]


def _hide(at_ms: int, *, running: bool) -> list[bytes]:
    """updateVirtualMachine displayvm=false: saveUsageEvent's VM.DESTROY (+ VM.STOP), no job."""
    flip = [_usage("VM.DESTROY", at_ms)] + ([_usage("VM.STOP", at_ms)] if running else [])
    return [*flip, _action("VM.UPDATE", at_ms, f"Successfully completed updating Vm. Vm Id: {VM1}")]


def _show_running(at_ms: int) -> list[bytes]:
    """updateVirtualMachine displayvm=true on a running VM: VM.CREATE and VM.START, saved."""
    flips = [_usage("VM.CREATE", at_ms), _usage("VM.START", at_ms)]
    return [*flips, _action("VM.UPDATE", at_ms, f"Successfully completed updating Vm. Vm Id: {VM1}")]


def _delivered(values: list[bytes]) -> list[Record]:
    """As one partition delivers them: offsets in publishing order."""
    return [Record(v, VM1.encode(), f"{PARTITION}@{i}", (PARTITION, i)) for i, v in enumerate(values)]


def _billed(store: Store) -> dict[int, int]:
    out: dict[int, int] = {}
    for key, qty in store.net_usage().items():
        if key.usage_type in (RUNNING_VM, ALLOCATED_VM):
            out[key.usage_type] = out.get(key.usage_type, 0) + qty
    return out


def _run(store: Store, settings: Settings, now: int, values: list[bytes]) -> dict[int, int]:
    c = Collector(store, settings, Clock(now))
    c.apply_events(_delivered(values))
    c.tick()
    return _billed(store)


def test_a_vm_deployed_hidden_is_not_billed_from_its_state_events(store: Store) -> None:
    """deployVirtualMachine displayvm=false with resource-state events on the bus (CloudStack's
    default, publish.resource.state.events=true) under kvmeter's default policy (running
    "usage_and_state"): the deploy job names the VM hidden and its VM.CREATE / VM.START were left
    out, but the state event Starting -> Running opened RUNNING anyway, billed until the
    reconciler's second pass (4 h here, no reconciler). CloudStack saved nothing: nothing billed."""
    assert _run(store, Settings(), T0 + 4 * HOUR, _deploy(T0, display=False)) == {}


def test_a_vm_hidden_after_its_deploy_and_started_is_not_billed_while_hidden(store: Store) -> None:
    """Deployed displayed (09:00), stopped (10:00), hidden (11:00: VM.DESTROY saved), started by
    startVirtualMachine (12:00: VM.START published, not saved; its job names the VM hidden),
    shown while running (13:00: VM.CREATE + VM.START saved), now 14:00. CloudStack bills RUNNING
    09-10 and 13-14, ALLOCATED 09-11 and 13-14. kvmeter billed RUNNING from 12:00 too (the left
    open case (a)); now the hidden start opens nothing, and the show bills as before."""
    events = [
        *_deploy(T0, display=True),
        *_stop(T0 + HOUR, display=True),
        *_hide(T0 + 2 * HOUR, running=False),
        *_start(T0 + 3 * HOUR, display=False),
        *_show_running(T0 + 4 * HOUR),
    ]
    assert _run(store, Settings(), T0 + 5 * HOUR, events) == {RUNNING_VM: 2 * HOUR, ALLOCATED_VM: 3 * HOUR}


def test_a_vm_recovered_while_hidden_and_started_is_not_billed(store: Store) -> None:
    """Deployed displayed (09:00), hidden while running (10:00: VM.DESTROY + VM.STOP saved),
    destroyed while hidden (11:00), recovered (12:00: VM.CREATE, not saved: the VM is hidden),
    started (13:00, its job names it hidden), now 15:00. CloudStack bills one hour of each.
    kvmeter opened ALLOCATED at the recover and RUNNING at the start (the left open case (b)):
    the start job says the VM was hidden since its last VM.CREATE, so neither counts."""
    events = [
        *_deploy(T0, display=True),
        *_hide(T0 + HOUR, running=True),
        *_stop(T0 + 2 * HOUR, display=False)[:-1],  # destroyVirtualMachine stops it first ...
        _state("Stopped", "Destroyed", T0 + 2 * HOUR),
        _usage("VM.DESTROY", T0 + 2 * HOUR),
        _job("VM.DESTROY", False, "Destroyed"),  # ... and its job names the VM hidden
        _state("Destroyed", "Stopped", T0 + 3 * HOUR),
        _usage("VM.CREATE", T0 + 3 * HOUR),
        _action("VM.RECOVER", T0 + 3 * HOUR, "Successfully completed recovering Vm"),
        *_start(T0 + 4 * HOUR, display=False),
    ]
    assert _run(store, Settings(), T0 + 6 * HOUR, events) == {RUNNING_VM: HOUR, ALLOCATED_VM: HOUR}


def test_running_by_state_bills_no_hidden_start(store: Store, tmp_path: Path) -> None:
    """The collector's config file with [policy] running = "state" (RUNNING from resource-state
    events alone, which carry no display flag): deployed displayed and stopped, hidden, then
    started by startVirtualMachine with the job naming it hidden. kvmeter billed RUNNING from the
    state event Starting -> Running until the reconciler (the left open case (c)); now not."""
    path = tmp_path / "collector.toml"
    path.write_text(f'[store]\nurl = "sqlite:///{tmp_path}/u.db"\n\n[policy]\nrunning = "state"\n')
    settings = config.load(path).settings
    events = [
        *_deploy(T0, display=True),
        *_stop(T0 + HOUR, display=True),
        *_hide(T0 + 2 * HOUR, running=False),
        *_start(T0 + 3 * HOUR, display=False),
    ]
    assert _run(store, settings, T0 + 5 * HOUR, events) == {RUNNING_VM: HOUR, ALLOCATED_VM: 2 * HOUR}


def test_a_hidden_start_no_job_tells_is_dropped_by_the_next_hidden_job(store: Store) -> None:
    """Deployed displayed (09:00), hidden while running (10:00: VM.DESTROY + VM.STOP saved),
    powered off out of band and started again by HA (11:00: state events and VM.START, published,
    not saved, no job), stopped by stopVirtualMachine (13:00, its job names the VM hidden), now
    14:00. CloudStack bills one hour of each. kvmeter billed RUNNING 11-13 until the reconciler;
    the stop job says the VM was hidden since the hide, so the HA start opens nothing."""
    events = [
        *_deploy(T0, display=True),
        *_hide(T0 + HOUR, running=True),
        _state("Running", "Stopped", T0 + 2 * HOUR),
        _usage("VM.STOP", T0 + 2 * HOUR),
        _state("Stopped", "Starting", T0 + 2 * HOUR),
        _state("Starting", "Running", T0 + 2 * HOUR),
        _usage("VM.START", T0 + 2 * HOUR),
        *_stop(T0 + 4 * HOUR, display=False),
    ]
    assert _run(store, Settings(), T0 + 5 * HOUR, events) == {RUNNING_VM: HOUR, ALLOCATED_VM: HOUR}


def test_a_hidden_start_no_job_tells_is_dropped_by_a_hidden_destroy_job(store: Store) -> None:
    """Deployed displayed (09:00), hidden while running (10:00: VM.DESTROY + VM.STOP saved),
    powered off out of band and started again by HA (11:00: state events and VM.START, published,
    not saved, no job), then destroyed by destroyVirtualMachine (13:00: VM.STOP and VM.DESTROY
    published, not saved; its job names the VM hidden), now 14:00. CloudStack bills one hour of
    each. The destroy job is the hidden VM's next job, as a stop job would be: the HA start opens
    nothing (the destroy's own VM.DESTROY, published while hidden, was taken for the hide's and
    hid the start from its job: RUNNING 11-13 was billed)."""
    events = [
        *_deploy(T0, display=True),
        *_hide(T0 + HOUR, running=True),
        _state("Running", "Stopped", T0 + 2 * HOUR),
        _usage("VM.STOP", T0 + 2 * HOUR),
        _state("Stopped", "Starting", T0 + 2 * HOUR),
        _state("Starting", "Running", T0 + 2 * HOUR),
        _usage("VM.START", T0 + 2 * HOUR),
        *_stop(T0 + 4 * HOUR, display=False)[:-1],  # destroyVirtualMachine stops it first ...
        _state("Stopped", "Destroyed", T0 + 4 * HOUR),
        _usage("VM.DESTROY", T0 + 4 * HOUR),
        _job("VM.DESTROY", False, "Destroyed"),  # ... and its job names the VM hidden
    ]
    assert _run(store, Settings(), T0 + 5 * HOUR, events) == {RUNNING_VM: HOUR, ALLOCATED_VM: HOUR}
