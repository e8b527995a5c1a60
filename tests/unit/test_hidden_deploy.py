"""A VM deployed hidden, from its completed deploy job (hidden_deploy.py): which of its VM usage
events the lifecycle leaves unapplied, as CloudStack saved none of them."""

from __future__ import annotations

import json

from kvmeter.collector.cloudstack import parse_event
from kvmeter.collector.lifecycle import as_read, build_resource_history
from kvmeter.proto import pb

VM = "9b1f0000-0000-0000-0000-0000000000vm"
ACCT = "3c5e0000-0000-0000-0000-00000000acct"


def usage(kind: str, when: str) -> pb.LifecycleEvent:
    doc = {"account": ACCT, "zone": "z1", "event": kind, "resource": "com.cloud.vm.VirtualMachine",
           "id": VM, "eventDateTime": when}  # fmt: skip
    return parse_event(json.dumps(doc).encode(), VM.encode())


def deploy_job(display: object, status: str = "SUCCEEDED", kind: str = "VM.CREATE") -> pb.LifecycleEvent:
    vm = {"id": VM, "name": "web-1", "serviceofferingid": "small", "displayvm": display}
    doc = {"command": "org.apache.cloudstack.api.command.user.vm.DeployVMCmd", "user": "u1",
           "account": ACCT, "instanceUuid": VM, "instanceType": "VirtualMachine",
           "commandEventType": kind, "jobId": "job-1", "jobResult": {"virtualmachine": vm},
           "status": status}  # fmt: skip
    return parse_event(json.dumps(doc).encode())


DEPLOY = [usage("VM.CREATE", "2024-05-14 10:00:00 +0000"), usage("VM.START", "2024-05-14 10:00:05 +0000")]


def _hours(segments: list) -> list[tuple[int, int | None]]:
    return [(s.start_ms, s.end_ms) for s in segments]


def test_the_job_result_names_the_display_flag_and_the_store_keeps_it() -> None:
    ev = deploy_job(False)
    assert ev.attributes["displayvm"] == "false"
    assert as_read(ev).attributes["displayvm"] == "false"
    assert deploy_job(True).attributes["displayvm"] == "true"
    assert "displayvm" not in deploy_job("false").attributes  # not a JSON boolean: not read


def test_only_a_completed_deploy_job_naming_the_vm_hidden_leaves_its_events_unapplied() -> None:
    """Displayed, failed, or another command's job (a start's result says nothing of how the VM
    was deployed): the deploy's events open ALLOCATED and RUNNING as before."""
    for job in (deploy_job(True), deploy_job(False, status="FAILED"), deploy_job(False, kind="VM.START")):
        hist = build_resource_history(VM, [*DEPLOY, job])
        assert (len(hist.allocated), len(hist.running)) == (1, 1), job
    hist = build_resource_history(VM, [*DEPLOY, deploy_job(False)])
    assert (hist.allocated, hist.running) == ([], [])
    assert {e.event_id for e in DEPLOY} <= set(hist.ignored)


def test_the_vm_create_that_shows_it_opens_again_and_later_events_count() -> None:
    shown = [usage("VM.CREATE", "2024-05-14 12:00:00 +0000"), usage("VM.START", "2024-05-14 12:00:00 +0000")]
    stop = usage("VM.STOP", "2024-05-14 13:00:00 +0000")
    hidden_stop = usage("VM.STOP", "2024-05-14 11:00:00 +0000")
    hist = build_resource_history(VM, [*DEPLOY, deploy_job(False), hidden_stop, *shown, stop])
    assert _hours(hist.allocated) == [(shown[0].time, None)]
    assert _hours(hist.running) == [(shown[1].time, stop.time)]
