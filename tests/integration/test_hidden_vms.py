"""VMs hidden from their owner (`updateVirtualMachine displayvm=false`, or deployed so) against
the reconciler, over HTTP with the real `cs` client, the CloudStack API double and a real store.

CloudStack's usage server bills a hidden VM no VM time: UsageEventUtils.publishUsageEvent saves
no usage event when its displayResource is false (UserVmStateListener passes the VM's display
flag), but still publishes the event on the bus, which carries no display flag. And
listVirtualMachines lists displayed VMs only unless `displayvm` is given, to root admins too
(ListVMsCmd.getDisplay defaults to true; QueryManagerImpl.searchForUserVMIdsAndCount filters on
it)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmeter.collector.model import ALLOCATED_VM, RUNNING_VM
from kvmeter.proto import pb
from tests.collector_support import ACCT_A, HOUR, T0, VM1, Stream, usage_event
from tests.harness import cloudstack_api as api
from tests.integration.test_reconcile import Rig, cloud_double


@pytest.fixture
def double() -> Iterator[api.CloudStackApiDouble]:
    with cloud_double() as d:
        yield d


@pytest.fixture
def rig(tmp_path: Path, double: api.CloudStackApiDouble) -> Iterator[Rig]:
    r = Rig(tmp_path, double)
    yield r
    r.store.close()


def _host_runs(rig: Rig, stream: Stream, *vms: str) -> None:
    """The agent's poll now: its inventory reports the domains running (a fresh witness)."""
    batch = pb.MeasureBatch.FromString(stream.batch([], poll_time=rig.clock.now))
    for uuid in vms:
        batch.inventory.add(uuid=uuid, name=f"i-2-{uuid[:4]}-VM", state=pb.RUNNING)
    rig.collector.apply_batch(batch.SerializeToString())


def test_hidden_running_vm_is_not_billed_forever(rig: Rig, double: api.CloudStackApiDouble) -> None:
    """A VM deployed hidden and started: the bus carries its VM.CREATE and VM.START (CloudStack
    saved neither as a usage event), so kvmeter opened ALLOCATED and RUNNING. The reconciler read
    listVirtualMachines without `displayvm`, so the VM was "not listed"; its host still runs it,
    which made that a dispute, "left running": kvmeter billed RUNNING_VM and ALLOCATED_VM for as
    long as the VM lived, which CloudStack's usage never bills. With two passes that see it
    hidden, both end at the first of them (the reconciler's best known time), once."""
    rig.events(usage_event("VM.CREATE", VM1, ACCT_A, T0), usage_event("VM.START", VM1, ACCT_A, T0 + HOUR))
    double.cloud["listVirtualMachines"] = [
        api.vm(VM1, "web-1", "alice", "Running", "small", T0, display=False)
    ]
    stream = Stream("s1", "h1")
    _host_runs(rig, stream, VM1)
    rig.run_pass()  # one witness: CloudStack now
    assert rig.corrections() == []
    first = rig.clock.now
    for _ in range(3):
        rig.clock.now += HOUR
        _host_runs(rig, stream, VM1)
        rig.run_pass()
    rows = [(r["event_type"], r["time_ms"]) for r in rig.corrections()]
    assert rows == [("VM.DESTROY", first)], f"a hidden VM stays billed: {rows}"
    [row] = rig.corrections()
    assert "displayvm" in row["reason"]
    assert rig.quantity(RUNNING_VM, VM1) == {ACCT_A: first - (T0 + HOUR)}
    assert rig.quantity(ALLOCATED_VM, VM1) == {ACCT_A: first - T0}


def test_hidden_vms_do_not_refuse_the_whole_pass(rig: Rig, double: api.CloudStackApiDouble) -> None:
    """Most of the VMs kvmeter has open are hidden (an operator hiding a tenant's fleet): without
    `displayvm=false` none of them was listed, so the guard against a key that sees part of the
    cloud refused every pass ("not listed: does the API key see the whole cloud?"), and nothing
    was reconciled any more, here the displayed VM whose stop the bus lost. Hidden VMs are
    listed, the pass goes through, and the lost stop is corrected."""
    hidden = [f"5e1d{i:04d}-0000-4000-8000-000000000000" for i in range(4)]
    for uuid in [VM1, *hidden]:
        rig.events(
            usage_event("VM.CREATE", uuid, ACCT_A, T0), usage_event("VM.START", uuid, ACCT_A, T0 + HOUR)
        )
    double.cloud["listVirtualMachines"] = [
        api.vm(VM1, "web-1", "alice", "Stopped", "small", T0),
        *(
            api.vm(u, f"hidden-{i}", "alice", "Running", "small", T0, display=False)
            for i, u in enumerate(hidden)
        ),
    ]
    rig.run_pass()
    first = rig.clock.now
    rig.run_pass(hours_later=1)
    assert rig.reconciler.last_error == ""
    stops = [(r["event_type"], r["time_ms"]) for r in rig.corrections() if r["resource"] == VM1]
    assert stops == [("VM.STOP", first)]
    assert any(
        r.get("displayvm") == "false" for r in double.requests if r["command"] == "listVirtualMachines"
    )


def test_a_hide_and_show_flip_is_billed_as_cloudstack_publishes_it(
    rig: Rig, double: api.CloudStackApiDouble
) -> None:
    """updateVirtualMachine displayvm=false on a running VM saves and publishes VM.DESTROY and
    VM.STOP (UserVmManagerImpl.saveUsageEvent); displayvm=true later, VM.CREATE and VM.START. In
    between CloudStack lists it hidden and Running, and its host runs it: the reconciler reopens
    nothing (no VM.CREATE / VM.START correction), so the VM is billed when shown only."""
    started_at, hidden_at = T0 + HOUR, rig.clock.now - HOUR
    rig.events(
        usage_event("VM.CREATE", VM1, ACCT_A, T0),
        usage_event("VM.START", VM1, ACCT_A, started_at),
        usage_event("VM.DESTROY", VM1, ACCT_A, hidden_at),
        usage_event("VM.STOP", VM1, ACCT_A, hidden_at),
    )
    double.cloud["listVirtualMachines"] = [
        api.vm(VM1, "web-1", "alice", "Running", "small", T0, display=False)
    ]
    stream = Stream("s1", "h1")
    for _ in range(2):
        _host_runs(rig, stream, VM1)
        rig.run_pass(hours_later=1)
    assert rig.corrections() == []
    shown_at = rig.clock.now + HOUR // 2
    rig.events(
        usage_event("VM.CREATE", VM1, ACCT_A, shown_at), usage_event("VM.START", VM1, ACCT_A, shown_at)
    )
    double.cloud["listVirtualMachines"] = [api.vm(VM1, "web-1", "alice", "Running", "small", T0)]
    rig.run_pass(hours_later=1)
    assert rig.corrections() == []
    running = rig.quantity(RUNNING_VM, VM1)
    assert running == {ACCT_A: (hidden_at - started_at) + (rig.clock.now - shown_at)}
