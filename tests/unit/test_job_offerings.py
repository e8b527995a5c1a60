"""Item: the offering from the bus. Async-job completions carry the API's response (jobResult, the
VM with its serviceofferingid, cpunumber and memory) but no time; usage events the time but no
offering. The lifecycle pairs them where that is unambiguous."""

from __future__ import annotations

import json

from kvmeter.collector.cloudstack import parse_event
from kvmeter.collector.lifecycle import build_resource_history
from kvmeter.proto import pb

VM = "9b1f0000-0000-0000-0000-0000000000vm"
ACCT = "3c5e0000-0000-0000-0000-00000000acct"
SMALL, LARGE = "off-small", "off-large"


def usage(kind: str, when: str) -> pb.LifecycleEvent:
    doc = {"account": ACCT, "zone": "z1", "event": kind, "resource": "com.cloud.vm.VirtualMachine",
           "id": VM, "eventDateTime": when}  # fmt: skip
    return parse_event(json.dumps(doc).encode(), VM.encode())


def job(command_event: str, offering: str, status: str = "SUCCEEDED") -> pb.LifecycleEvent:
    """AsyncJobEvent `complete` as ApiServer.handleAsyncJobPublishEvent builds it (PR #5453:
    jobResult an object, the UserVmResponse under its response name)."""
    vm = {"id": VM, "name": "web-1", "state": "Running", "serviceofferingid": offering,
          "serviceofferingname": offering, "cpunumber": 2 if offering == LARGE else 1,
          "memory": 2048 if offering == LARGE else 512,
          "nic": [{"id": "n1", "macaddress": "02:00:00:00:00:01", "ipaddress": "10.1.1.5",
                   "networkid": "net-1"}]}  # fmt: skip
    doc = {"command": "org.apache.cloudstack.api.command.user.vm.ScaleVMCmd", "user": "u1",
           "account": ACCT, "processStatus": "0", "resultCode": "0", "instanceUuid": VM,
           "instanceType": "VirtualMachine", "commandEventType": command_event, "jobId": "job-" + offering,
           "jobResult": {"virtualmachine": vm}, "cmdInfo": {"id": VM}, "status": status}  # fmt: skip
    return parse_event(json.dumps(doc).encode())


def test_job_result_gives_offering_cpu_and_memory() -> None:
    ev = job("VM.DYNAMIC.SCALE", LARGE)
    assert ev.category == pb.ASYNC_JOB
    assert (ev.offering_uuid, ev.attributes["cpunumber"], ev.attributes["memory"]) == (LARGE, "2", "2048")


def test_deploy_job_names_the_first_offering_and_scale_job_the_split() -> None:
    events = [
        usage("VM.CREATE", "2024-05-14 10:00:00 +0000"),
        usage("VM.START", "2024-05-14 10:00:05 +0000"),
        job("VM.CREATE", SMALL),
        usage("VM.DYNAMIC.SCALE", "2024-05-14 11:00:00 +0000"),
        job("VM.DYNAMIC.SCALE", LARGE),
    ]
    for order in (events, events[::-1]):
        h = build_resource_history(VM, order)
        assert [s.offering for s in h.running] == [SMALL, LARGE]
        assert [s.offering for s in h.allocated] == [SMALL, LARGE]
        split = h.running[0].end_ms
        assert split == h.running[1].start_ms == h.allocated[1].start_ms
        assert split == usage("VM.DYNAMIC.SCALE", "2024-05-14 11:00:00 +0000").time
        assert h.running[1].end_ms is None


def test_failed_or_ambiguous_jobs_name_nothing() -> None:
    base = [usage("VM.CREATE", "2024-05-14 10:00:00 +0000"), usage("VM.UPGRADE", "2024-05-14 11:00:00 +0000")]
    failed = build_resource_history(VM, [*base, job("VM.UPGRADE", LARGE, status="FAILED")])
    assert [s.offering for s in failed.allocated] == [""]
    two = [
        *base,
        usage("VM.UPGRADE", "2024-05-14 12:00:00 +0000"),
        job("VM.UPGRADE", LARGE),
        job("VM.UPGRADE", SMALL),
    ]
    assert [s.offering for s in build_resource_history(VM, two).allocated] == [""]
