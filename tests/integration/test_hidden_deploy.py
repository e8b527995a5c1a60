"""A VM deployed hidden (`deployVirtualMachine displayvm=false`) through the real Collector and
store, its bus events as CloudStack writes them: the usage events carry no display flag
(engine/components-api/.../event/UsageEventUtils.java, private publishUsageEvent: account, zone,
event, resource, id, eventDateTime; the `displayResource` overloads skip saveUsageEvent only),
but the deploy's completed async job does: its jobResult is the VM as DeployVMCmd returned it
(server/.../api/ApiServer.java, the async-job event: "jobResult" =
ApiSerializerHelper.fromSerializedStringToMap(job.getResult())), whose `displayvm`
UserVmJoinDaoImpl.newUserVmResponse always sets (api/.../response/UserVmResponse.java,
@SerializedName(ApiConstants.DISPLAY_VM))."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmeter.collector.model import ALLOCATED_VM, RUNNING_VM, Record, Settings
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store
from kvmeter.proto import pb
from tests.collector_support import ACCT_A, HOUR, T0, VM1, Clock, Stream, usage_event
from tests.harness import cloudstack_api as api
from tests.integration.test_reconcile import Rig, cloud_double


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path}/u.db")
    s.migrate()
    yield s
    s.close()


def _deploy_job(display: bool) -> Record:
    """The completed deployVirtualMachine job as the bus carries it (the keys of ApiServer's
    async-job event; no eventDateTime), its VM with `displayvm` as the API returned it."""
    vm = {"id": VM1, "name": "web-1", "serviceofferingid": "small", "displayvm": display, "state": "Running"}
    doc = {
        "command": "org.apache.cloudstack.api.command.user.vm.DeployVMCmd",
        "user": "u-1",
        "account": ACCT_A,
        "processStatus": "0",
        "resultCode": "0",
        "instanceUuid": VM1,
        "instanceType": "VirtualMachine",
        "commandEventType": "VM.CREATE",
        "jobId": "job-deploy",
        "jobResult": {"virtualmachine": vm},
        "cmdInfo": {"serviceofferingid": "small", "displayvm": str(display).lower()},
        "status": "SUCCEEDED",
    }
    return Record(json.dumps(doc).encode(), VM1.encode(), "")


def _rec(kv: tuple[bytes, bytes]) -> Record:
    key, value = kv
    return Record(value, key, "")


def _billed(store: Store) -> dict[int, int]:
    out: dict[int, int] = {}
    for key, qty in store.net_usage().items():
        if key.usage_type in (RUNNING_VM, ALLOCATED_VM):
            out[key.usage_type] = out.get(key.usage_type, 0) + qty
    return out


def test_a_vm_deployed_hidden_is_billed_no_vm_time(store: Store) -> None:
    """deployVirtualMachine displayvm=false: CloudStack publishes VM.CREATE and VM.START on the
    bus but saves neither (UserVmStateListener / UserVmManagerImpl pass vm.isDisplayVm()), so its
    usage server bills no VM time; the completed deploy job says the VM is hidden. kvmeter billed
    RUNNING_VM and ALLOCATED_VM from the deploy until the reconciler's second pass saw it hidden;
    now nothing, from the events alone (a second collector on the same store agrees: the stored
    events keep the flag)."""
    clock = Clock(T0 + 4 * HOUR)
    c = Collector(store, Settings(), clock)
    c.apply_events(
        [
            _rec(usage_event("VM.CREATE", VM1, ACCT_A, T0)),
            _rec(usage_event("VM.START", VM1, ACCT_A, T0)),
            _deploy_job(display=False),
        ]
    )
    c.tick()
    assert _billed(store) == {}
    replica = Collector(store, Settings(), Clock(T0 + 5 * HOUR))
    replica.tick()
    assert _billed(store) == {}


def test_a_vm_deployed_hidden_then_shown_is_billed_from_the_show(store: Store) -> None:
    """The other direction: updateVirtualMachine displayvm=true on the running VM publishes and
    saves VM.CREATE and VM.START (isDisplay true from then on), where CloudStack's usage starts.
    kvmeter bills RUNNING_VM and ALLOCATED_VM from the show (2 h of 4), not from the deploy."""
    clock = Clock(T0 + 4 * HOUR)
    c = Collector(store, Settings(), clock)
    c.apply_events(
        [
            _rec(usage_event("VM.CREATE", VM1, ACCT_A, T0)),
            _rec(usage_event("VM.START", VM1, ACCT_A, T0)),
            _deploy_job(display=False),
            _rec(usage_event("VM.CREATE", VM1, ACCT_A, T0 + 2 * HOUR)),
            _rec(usage_event("VM.START", VM1, ACCT_A, T0 + 2 * HOUR)),
        ]
    )
    c.tick()
    assert _billed(store) == {RUNNING_VM: 2 * HOUR, ALLOCATED_VM: 2 * HOUR}


def test_the_reconciler_finds_nothing_to_close_on_a_vm_deployed_hidden(tmp_path: Path) -> None:
    """With the reconciler (real `cs` client, the CloudStack API double listing the VM hidden and
    Running, its host running it): before, the deploy's VM.CREATE / VM.START opened ALLOCATED
    and RUNNING, and the second pass closed them at the first one, so the time from the deploy
    to the first pass stayed billed, which CloudStack bills none of. Now nothing is opened, so
    there is nothing to correct and nothing billed; the reconciler's check stays the safety net."""
    with cloud_double() as double:
        rig = Rig(tmp_path, double)
        try:
            deployed = rig.clock.now - HOUR
            rig.collector.apply_events(
                [
                    _rec(usage_event("VM.CREATE", VM1, ACCT_A, deployed)),
                    _rec(usage_event("VM.START", VM1, ACCT_A, deployed)),
                    _deploy_job(display=False),
                ]
            )
            double.cloud["listVirtualMachines"] = [
                api.vm(VM1, "web-1", "alice", "Running", "small", deployed, display=False)
            ]
            stream = Stream("s1", "h1")
            for hours in (0, 1, 1):  # three passes an hour apart, the host's poll fresh at each
                rig.clock.now += hours * HOUR
                batch = pb.MeasureBatch.FromString(stream.batch([], poll_time=rig.clock.now))
                batch.inventory.add(uuid=VM1, name="i-2-9-VM", state=pb.RUNNING)
                rig.collector.apply_batch(batch.SerializeToString())
                rig.run_pass()
            assert rig.corrections() == []
            assert rig.quantity(RUNNING_VM, VM1) == {}
            assert rig.quantity(ALLOCATED_VM, VM1) == {}
        finally:
            rig.store.close()
