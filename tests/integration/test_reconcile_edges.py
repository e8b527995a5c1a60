"""The reconciler and its CloudStack client against the API double at their edges: a pass read
before a scaling event the bus then delivered leaves that offering alone; a list that changed
while it was paged is no complete answer (nothing "not listed" is corrected away); the signed
request (API key, signature) is in no error the reconciler logs or reports."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmeter.collector.cs_client import CloudStackApi
from kvmeter.collector.model import Settings
from kvmeter.collector.reconciler import Reconciler
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store
from tests.collector_support import ACCT_A, HOUR, T0, VM1, Clock, usage_event
from tests.harness import cloudstack_api as api
from tests.integration.test_reconcile import Rig, cloud_double


@pytest.fixture
def cloud() -> Iterator[api.CloudStackApiDouble]:
    with cloud_double() as d:
        yield d


@pytest.fixture
def rig(tmp_path: Path, cloud: api.CloudStackApiDouble) -> Iterator[Rig]:
    r = Rig(tmp_path, cloud)
    yield r
    r.store.close()


def scale_job(
    vm: str, offering: str, cpu: int, memory: int, command_event: str = "VM.DYNAMIC.SCALE"
) -> tuple[bytes, bytes]:
    """AsyncJobEvent `complete` of scaleVirtualMachine / deployVirtualMachine: jobResult holds the
    UserVmResponse (offering, cpunumber, memory), as in tests/unit/test_job_offerings.py."""
    body = {
        "id": vm,
        "name": "web-1",
        "state": "Running",
        "serviceofferingid": offering,
        "serviceofferingname": offering,
        "cpunumber": cpu,
        "memory": memory,
        "nic": [],
    }
    doc = {
        "command": "org.apache.cloudstack.api.command.user.vm.ScaleVMCmd",
        "user": "u1",
        "account": ACCT_A,
        "processStatus": "0",
        "resultCode": "0",
        "instanceUuid": vm,
        "instanceType": "VirtualMachine",
        "commandEventType": command_event,
        "jobId": f"job-{command_event}-{offering}",
        "jobResult": {"virtualmachine": body},
        "cmdInfo": {"id": vm},
        "status": "SUCCEEDED",
    }
    return vm.encode(), json.dumps(doc).encode()


def test_snapshot_read_before_a_scaling_event_does_not_undo_it(
    rig: Rig, cloud: api.CloudStackApiDouble
) -> None:
    """The pass's snapshot is read on a thread (taken_ms = when the read began) and planned later
    in the feed loop, after lifecycle events that arrived meanwhile. A VM scaled small -> large
    on the bus (usage VM.DYNAMIC.SCALE + the job naming `large`) a few seconds after the read
    began: the snapshot still says `small`, the previous pass said `small` too, so
    reconcile_offerings takes it as "the previous pass saw it already" and adds a
    VM.DYNAMIC.SCALE back to `small` at the scaling event's own time (max(previous, start)):
    the event the bus correctly delivered is undone and the VM is billed `small` until the next
    pass. A snapshot older than the VM's last event says nothing about its offering (as _vms
    refuses a previous pass older than the last event)."""
    rig.events(
        usage_event("VM.CREATE", VM1, ACCT_A, T0),
        scale_job(VM1, "small", 1, 512, command_event="VM.CREATE"),
        usage_event("VM.START", VM1, ACCT_A, T0 + HOUR),
    )
    cloud.cloud["listVirtualMachines"] = [api.vm(VM1, "web-1", "alice", "Running", "small", T0)]
    rig.run_pass()  # agrees: small, nothing to correct
    assert rig.corrections() == []
    rig.clock.now += HOUR
    snapshot = rig.reconciler.fetch()  # the thread's read; CloudStack still says small
    assert snapshot is not None
    scaled_at = rig.clock.now + 20_000  # the scale completes 20 s after the read began
    rig.events(usage_event("VM.DYNAMIC.SCALE", VM1, ACCT_A, scaled_at), scale_job(VM1, "large", 2, 2048))
    history = rig.collector.histories[VM1]
    assert [s.offering for s in history.running] == ["small", "large"]  # the bus said it right
    rig.clock.now = scaled_at + 60_000
    rig.reconciler.apply(snapshot)  # the feed loop plans the snapshot after those events
    undone = [(r["event_type"], r["offering"], r["time_ms"]) for r in rig.corrections()]
    assert undone == [], f"the snapshot read before the scale undid it: {undone}"
    history = rig.collector.histories[VM1]
    assert history.running[-1].offering == "large"


def _closed_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_unreachable_api_leaks_no_key_nor_signature(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The `cs` client signs with GET: apiKey, expires and signature are in the URL's query.
    requests' ConnectionError (refused, DNS, connect timeout: "Max retries exceeded with url:
    /client/api?...apiKey=...&signature=...") quotes that URL, and cs_client wraps str(exc) into
    ApiUnavailable; the reconciler logs it at WARNING and keeps it as last_error, which
    Reconciler.status() puts into /health (served without a credential, collector/api.py).
    The signature stays valid until `expires` (10 minutes, cs.EXPIRATION): anyone reading the log
    or /health could replay the root admin's listVirtualMachines: neither is in what is logged
    or reported."""
    store = Store(f"sqlite:///{tmp_path}/usage.db")
    store.migrate()
    try:
        collector = Collector(store, Settings(), Clock(T0))
        client = CloudStackApi(f"http://127.0.0.1:{_closed_port()}/client/api", api.API_KEY, api.SECRET, 2)
        reconciler = Reconciler(collector, client.snapshot)
        with caplog.at_level("WARNING"):
            assert reconciler.fetch() is None
        reported = json.dumps(reconciler.status()) + caplog.text
        assert re.findall(r"signature=[^<&\s)'\"]+", reported) == [], reported
        assert api.API_KEY not in reported, reported
    finally:
        store.close()


class ExpungingDuringReads(api.CloudStackApiDouble):
    """CloudStack lists VMs ordered by id (QueryManagerImpl: Filter(UserVmVO, "id", true, start,
    pagesize)); a VM expunged between two page reads shifts every later VM one place back, so
    the first VM of page 2 slides onto page 1, already read: it is in neither page. Here one
    older VM is expunged right after each read of page 1 of listVirtualMachines."""

    def _answer(self, h: Any, pairs: list[tuple[str, str]]) -> None:
        super()._answer(h, pairs)
        args = dict(pairs)
        if (
            args.get("command") == "listVirtualMachines"
            and args.get("page") == "1"
            and "projectid" not in args
        ):
            self.cloud["listVirtualMachines"].pop(0)


def test_a_list_that_changed_between_pages_destroys_no_running_vm(tmp_path: Path) -> None:
    """Every page answered 200, page 1 announcing count=501, and 500 items came in all (the `cs`
    client's fetch_list stops on an empty page whatever count claims). Two passes in a row with
    an expunge mid-read (a busy cloud) and the running VM at the page boundary, Running in
    CloudStack all along: a list whose items fall short of the count announced (or whose count
    changed between pages) is read again, then the pass given up, never taken as "not listed"
    (a VM.DESTROY closing RUNNING and ALLOCATED)."""
    with ExpungingDuringReads() as double:
        double.cloud["listAccounts"] = [api.account(ACCT_A, "alice")]
        double.cloud["listDomains"] = [api.domain()]
        double.cloud["listServiceOfferings"] = [api.offering("small", "Small", 1, 512)]
        # 520 older VMs of an account kvmeter cannot resolve (left alone, notes only), being
        # expunged one by one; ours is the newest (highest id), listed Running throughout.
        others = [api.vm(f"0000{i:04d}-old", f"ci-{i}", "carol", "Running", "small", T0) for i in range(520)]
        double.cloud["listVirtualMachines"] = [
            *others[:500],
            api.vm(VM1, "web-1", "alice", "Running", "small", T0),
        ]
        rig = Rig(tmp_path, double)
        try:
            rig.events(
                usage_event("VM.CREATE", VM1, ACCT_A, T0), usage_event("VM.START", VM1, ACCT_A, T0 + HOUR)
            )
            rig.run_pass()
            double.cloud["listVirtualMachines"].insert(0, others[500])  # the next pass's victim
            rig.run_pass(hours_later=0.1)
            made = [(r["event_type"], r["resource"]) for r in rig.corrections()]
            ended = [m for m in made if m[0] in ("VM.STOP", "VM.DESTROY", "VM.EXPUNGE")]
            assert ended == [], f"a running VM CloudStack lists was corrected away: {made}"
            assert rig.collector.histories[VM1].running[-1].end_ms is None
        finally:
            rig.store.close()
