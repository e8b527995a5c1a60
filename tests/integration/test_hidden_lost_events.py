"""VMs hidden from their owner (displayvm=false) when the bus lost an event, or when no job
follows: the bus events as CloudStack writes them (tests/integration/test_hidden_jobs.py's
helpers), in one Kafka partition's order, through the real Collector and store.

What CloudStack publishes (apache/cloudstack): hiding a VM that is not destroyed publishes and
saves VM.DESTROY, then VM.STOP when it runs; showing it, VM.CREATE, then VM.START
(UserVmManagerImpl.saveUsageEvent; nothing for a Destroyed / Expunging / Error VM). While it is
hidden its usage events are published, not saved (UsageEventUtils.publishUsageEvent with
displayResource false). recoverVirtualMachine is synchronous, its VM.CREATE (UserVmStateListener,
Destroyed -> Stopped) carries the VM's display flag. The bus is fire-and-forget: any one event
may be lost."""

from __future__ import annotations

from kvmeter.collector.model import ALLOCATED_VM, RUNNING_VM, Settings
from kvmeter.collector.store import Store
from tests.collector_support import HOUR, T0
from tests.integration.test_hidden_jobs import _action, _deploy, _job, _run, _start, _state, _stop, _usage


def _ha_restart(at_ms: int) -> list[bytes]:
    """The host lost the VM and HA started it again: state events and VM.STOP / VM.START, no job."""
    return [
        _state("Running", "Stopped", at_ms),
        _usage("VM.STOP", at_ms),
        _state("Stopped", "Starting", at_ms),
        _state("Starting", "Running", at_ms),
        _usage("VM.START", at_ms),
    ]


def _hide_running(at_ms: int, *, destroy_delivered: bool = True) -> list[bytes]:
    """updateVirtualMachine displayvm=false on a running VM: VM.DESTROY then VM.STOP, saved."""
    flip = ([_usage("VM.DESTROY", at_ms)] if destroy_delivered else []) + [_usage("VM.STOP", at_ms)]
    return [*flip, _action("VM.UPDATE", at_ms, "Successfully completed updating Vm")]


def _show_running(at_ms: int) -> list[bytes]:
    """updateVirtualMachine displayvm=true on a running VM: VM.CREATE then VM.START, saved."""
    flip = [_usage("VM.CREATE", at_ms), _usage("VM.START", at_ms)]
    return [*flip, _action("VM.UPDATE", at_ms, "Successfully completed updating Vm")]


def _destroy_hidden(at_ms: int, *, destroy_delivered: bool = True) -> list[bytes]:
    """destroyVirtualMachine on a running hidden VM: stopped, destroyed, its job naming it hidden."""
    stop = _stop(at_ms, display=False)[:-1]
    destroy = [_usage("VM.DESTROY", at_ms)] if destroy_delivered else []
    return [*stop, _state("Stopped", "Destroyed", at_ms), *destroy, _job("VM.DESTROY", False, "Destroyed")]


def test_a_lost_hide_leaves_the_visible_start_before_it_billed(store: Store) -> None:
    """Deployed displayed (09:00), restarted by HA (10:00, no job), hidden while running (11:00:
    its VM.DESTROY lost on the bus, its VM.STOP delivered), stopped by stopVirtualMachine (12:00,
    its job naming the VM hidden), now 13:00. CloudStack bills RUNNING 09-11. The stop job dropped
    every start since the deploy job, the HA start included: RUNNING 10-11 was never billed. Now
    only a start after a sign of hiding (a VM.DESTROY, a job naming it hidden) is left out.
    ALLOCATED stays open past the lost hide (09-13) until the reconciler, as before."""
    events = [
        *_deploy(T0, display=True),
        *_ha_restart(T0 + HOUR),
        *_hide_running(T0 + 2 * HOUR, destroy_delivered=False),
        *_stop(T0 + 3 * HOUR, display=False),
    ]
    assert _run(store, Settings(), T0 + 4 * HOUR, events) == {RUNNING_VM: 2 * HOUR, ALLOCATED_VM: 4 * HOUR}


def test_a_lost_destroy_leaves_the_visible_start_before_the_hide_billed(store: Store) -> None:
    """Deployed displayed (09:00), restarted by HA (10:00, no job), hidden while running (11:00:
    VM.DESTROY + VM.STOP delivered), destroyed by destroyVirtualMachine while hidden (12:00: its
    own VM.DESTROY lost, its job naming the VM hidden), now 13:00. CloudStack bills RUNNING and
    ALLOCATED 09-11. The destroy job took the hide's VM.DESTROY for its own and dropped the start
    before it (the HA start, visible): RUNNING 10-11 was never billed."""
    events = [
        *_deploy(T0, display=True),
        *_ha_restart(T0 + HOUR),
        *_hide_running(T0 + 2 * HOUR),
        *_destroy_hidden(T0 + 3 * HOUR, destroy_delivered=False),
    ]
    assert _run(store, Settings(), T0 + 4 * HOUR, events) == {RUNNING_VM: 2 * HOUR, ALLOCATED_VM: 2 * HOUR}


def test_a_visible_recover_before_a_lost_hide_stays_billed(store: Store) -> None:
    """Deployed displayed and stopped (09:00-10:00), destroyed (10:00, its job naming the VM
    displayed), recovered (11:00: VM.CREATE saved, the VM displayed), hidden (12:00: its VM.DESTROY
    lost), started by startVirtualMachine (13:00, its job naming the VM hidden), now 14:00.
    CloudStack bills ALLOCATED 09-10 and 11-12. The start job dropped the recover's VM.CREATE as
    a recover while hidden: ALLOCATED 11-12 never billed. Now a recover is left out only after a
    job naming the VM hidden; with the hide lost, ALLOCATED runs from 11:00 to the reconciler
    (here 14:00), and the hidden start (the job's own) is still left out."""
    events = [
        *_deploy(T0, display=True),
        *_stop(T0 + HOUR, display=True),
        _state("Stopped", "Destroyed", T0 + HOUR),
        _usage("VM.DESTROY", T0 + HOUR),
        _job("VM.DESTROY", True, "Destroyed"),
        _state("Destroyed", "Stopped", T0 + 2 * HOUR),
        _usage("VM.CREATE", T0 + 2 * HOUR),
        _action("VM.RECOVER", T0 + 2 * HOUR, "Successfully completed recovering Vm"),
        _action("VM.UPDATE", T0 + 3 * HOUR, "Successfully completed updating Vm"),  # the hide
        _state("Stopped", "Starting", T0 + 4 * HOUR),
        _state("Starting", "Running", T0 + 4 * HOUR),
        _usage("VM.START", T0 + 4 * HOUR),
        _job("VM.START", False, "Running"),
    ]
    assert _run(store, Settings(), T0 + 5 * HOUR, events) == {RUNNING_VM: HOUR, ALLOCATED_VM: 4 * HOUR}


def test_a_hidden_start_no_job_follows_is_not_billed(store: Store) -> None:
    """Deployed displayed (09:00), hidden while running (10:00: VM.DESTROY + VM.STOP saved),
    restarted by HA (11:00: published, not saved, no job), no job since, now 13:00. CloudStack
    bills one hour of each. kvmeter billed RUNNING from 11:00 until the reconciler's second pass
    (up to about a period, here 2 h); a start after the hide's VM.DESTROY is one of a hidden VM
    (a destroyed VM starts again only after a recover's VM.CREATE), so it opens nothing."""
    events = [*_deploy(T0, display=True), *_hide_running(T0 + HOUR), *_ha_restart(T0 + 2 * HOUR)]
    assert _run(store, Settings(), T0 + 4 * HOUR, events) == {RUNNING_VM: HOUR, ALLOCATED_VM: HOUR}


def test_a_vm_recovered_while_hidden_and_left_stopped_is_not_billed(store: Store) -> None:
    """Deployed displayed (09:00), hidden while running (10:00), destroyed while hidden (11:00, its
    job naming the VM hidden), recovered (12:00: VM.CREATE published, not saved), left stopped,
    now 15:00. CloudStack bills one hour of each. kvmeter billed ALLOCATED from the recover until
    the reconciler (here 3 h): after a job naming the VM hidden, with no update since that could
    have shown it (a destroyed VM shown publishes no usage event), the recover is a hidden one."""
    events = [
        *_deploy(T0, display=True),
        *_hide_running(T0 + HOUR),
        *_destroy_hidden(T0 + 2 * HOUR),
        _state("Destroyed", "Stopped", T0 + 3 * HOUR),
        _usage("VM.CREATE", T0 + 3 * HOUR),
        _action("VM.RECOVER", T0 + 3 * HOUR, "Successfully completed recovering Vm"),
    ]
    assert _run(store, Settings(), T0 + 6 * HOUR, events) == {RUNNING_VM: HOUR, ALLOCATED_VM: HOUR}


def test_a_hidden_start_before_the_vm_is_shown_is_not_billed(store: Store) -> None:
    """Deployed displayed (09:00), hidden while running (10:00), restarted by HA while hidden
    (11:00, no job), shown while running (12:00: VM.CREATE + VM.START saved), now 13:00. CloudStack
    bills RUNNING and ALLOCATED 09-10 and 12-13. The show's VM.CREATE ended the stretch without a
    job naming the VM hidden, so the HA start opened RUNNING at 11:00 and the show's VM.START found
    it open: RUNNING 11-12 billed for good (the reconciler sees the VM displayed). The show says the
    VM was hidden until then: the HA start opens nothing."""
    events = [
        *_deploy(T0, display=True),
        *_hide_running(T0 + HOUR),
        *_ha_restart(T0 + 2 * HOUR),
        *_show_running(T0 + 3 * HOUR),
    ]
    assert _run(store, Settings(), T0 + 4 * HOUR, events) == {RUNNING_VM: 2 * HOUR, ALLOCATED_VM: 2 * HOUR}


def test_a_recover_whose_vm_create_was_lost_still_ends_what_the_destroy_hid(store: Store) -> None:
    """No async-job events on the bus (publish.async.job.events=false): a displayed VM deployed
    (09:00), stopped and destroyed by its owner (10:00), recovered (11:00: its state event
    Destroyed -> Stopped delivered, its VM.CREATE lost) and started (12:00); now 13:00. CloudStack
    bills RUNNING 09-10 and 12-13. The destroy's VM.DESTROY made every later start look hidden
    until a VM.CREATE: the visible start at 12:00 was dropped. The recover's state event says
    what its VM.CREATE would: the VM is back with the display flag it had."""
    no_job = [_usage("VM.CREATE", T0), _state("Stopped", "Starting", T0), _state("Starting", "Running", T0)]
    events = [
        *no_job,
        _usage("VM.START", T0),
        *_stop(T0 + HOUR, display=True)[:-1],
        _state("Stopped", "Destroyed", T0 + HOUR),
        _usage("VM.DESTROY", T0 + HOUR),
        _state("Destroyed", "Stopped", T0 + 2 * HOUR),
        _state("Stopped", "Starting", T0 + 3 * HOUR),
        _state("Starting", "Running", T0 + 3 * HOUR),
        _usage("VM.START", T0 + 3 * HOUR),
    ]
    assert _run(store, Settings(), T0 + 4 * HOUR, events)[RUNNING_VM] == 2 * HOUR


def _destroyed_hidden_recovered(at_ms: int) -> list[bytes]:
    """A stopped, displayed VM destroyed (its job naming it displayed), hidden while destroyed an
    hour later (VM.UPDATE alone), recovered an hour after that (Destroyed -> Stopped, VM.CREATE)."""
    return [
        _state("Stopped", "Destroyed", at_ms),
        _usage("VM.DESTROY", at_ms),
        _job("VM.DESTROY", True, "Destroyed"),
        _action("VM.UPDATE", at_ms + HOUR, "Successfully completed updating Vm"),  # the hide
        _state("Destroyed", "Stopped", at_ms + 2 * HOUR),
        _usage("VM.CREATE", at_ms + 2 * HOUR),
        _action("VM.RECOVER", at_ms + 2 * HOUR, "Successfully completed recovering Vm"),
    ]


def test_a_recover_while_hidden_then_a_hidden_start_job_is_not_billed(store: Store) -> None:
    """Deployed displayed (09:00), stopped (10:00), destroyed (11:00), hidden while destroyed
    (12:00), recovered (13:00: VM.CREATE not saved), started by startVirtualMachine (14:00, its
    job naming the VM hidden), now 16:00. CloudStack bills RUNNING 09-10 and ALLOCATED 09-11.
    Only the start was left out: ALLOCATED ran from 13:00 to the reconciler (for good without
    one). The job, with no VM.UPDATE nor VM.DESTROY since the recover (a hide after it publishes
    both), says the recover was hidden too."""
    events = [
        *_deploy(T0, display=True),
        *_stop(T0 + HOUR, display=True),
        *_destroyed_hidden_recovered(T0 + 2 * HOUR),
        *_start(T0 + 5 * HOUR, display=False),
    ]
    assert _run(store, Settings(), T0 + 7 * HOUR, events) == {RUNNING_VM: HOUR, ALLOCATED_VM: 2 * HOUR}


def test_a_recover_while_hidden_then_a_hidden_destroy_job_is_not_billed(store: Store) -> None:
    """As above, but the recovered VM (13:00) is destroyed again by destroyVirtualMachine (14:00:
    its own VM.DESTROY published while hidden, its job naming the VM hidden), now 16:00.
    CloudStack bills RUNNING 09-10 and ALLOCATED 09-11. ALLOCATED 13-14 was billed (the
    VM.DESTROY closed it: for good, the reconciler sees nothing open); the job, with only its
    own VM.DESTROY since the recover, says the recover was hidden."""
    events = [
        *_deploy(T0, display=True),
        *_stop(T0 + HOUR, display=True),
        *_destroyed_hidden_recovered(T0 + 2 * HOUR),
        _state("Stopped", "Destroyed", T0 + 5 * HOUR),
        _usage("VM.DESTROY", T0 + 5 * HOUR),
        _job("VM.DESTROY", False, "Destroyed"),
    ]
    assert _run(store, Settings(), T0 + 7 * HOUR, events) == {RUNNING_VM: HOUR, ALLOCATED_VM: 2 * HOUR}
