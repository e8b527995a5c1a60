"""Reconciliation against the CloudStack API double over HTTP, with the real `cs` client (signed
requests, paging) and a real store: lost STOP / START / IP release, a router with no metadata,
a scaled VM with no offering on the bus, the API down or answering nonsense."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import g
from prometheus_client import generate_latest

from kvmeter.collector.api import create_app
from kvmeter.collector.api_auth import Principal
from kvmeter.collector.cs_client import UNSCOPED_LISTS, ApiUnavailable, CloudStackApi
from kvmeter.collector.metrics import Metrics
from kvmeter.collector.model import ALLOCATED_VM, IP_ADDRESS, NETWORK_BYTES_SENT, RUNNING_VM, Record, Settings
from kvmeter.collector.reconciler import Reconciler
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store, reconciliation
from kvmeter.proto import pb
from tests.collector_support import ACCT_A, ACCT_B, HOUR, IP1, ROUTER, T0, VM1, Clock, M, Stream, usage_event
from tests.harness import cloudstack_api as api

ROUTER_NAME = "r-5-VM"


@contextlib.contextmanager
def cloud_double() -> Iterator[api.CloudStackApiDouble]:
    """CloudStack's API double with alice and bob in one domain, a small and a large offering."""
    with api.CloudStackApiDouble() as d:
        d.cloud["listAccounts"] = [api.account(ACCT_A, "alice"), api.account(ACCT_B, "bob")]
        d.cloud["listDomains"] = [api.domain()]
        d.cloud["listServiceOfferings"] = [
            api.offering("small", "Small", 1, 512),
            api.offering("large", "Large", 2, 2048),
        ]
        yield d


@pytest.fixture
def double() -> Iterator[api.CloudStackApiDouble]:
    with cloud_double() as d:
        yield d


class Rig:
    def __init__(self, tmp_path: Path, double: api.CloudStackApiDouble, secret: str = api.SECRET) -> None:
        self.clock = Clock(T0 + 10 * HOUR)
        self.store = Store(f"sqlite:///{tmp_path}/usage.db")
        self.store.migrate()
        self.collector = Collector(self.store, Settings(), self.clock)
        self.metrics = Metrics()
        client = CloudStackApi(double.endpoint, api.API_KEY, secret, timeout_s=5)
        self.reconciler = Reconciler(self.collector, client.snapshot, metrics=self.metrics)

    def events(self, *records: tuple[bytes, bytes]) -> None:
        self.collector.apply_events([Record(value, key) for key, value in records])

    def run_pass(self, hours_later: float = 0) -> Any:
        """One pass at clock + hours: fetch through HTTP, apply, then the collector's tick."""
        self.clock.now += int(hours_later * HOUR)
        snapshot = self.reconciler.fetch()
        out = self.reconciler.apply(snapshot) if snapshot is not None else None
        self.collector.tick()
        return out

    def corrections(self, offerings: bool = False) -> list[dict[str, Any]]:
        """Stored corrections; those naming an offering only when asked."""
        with self.store.read() as conn:
            rows = reconciliation.list_corrections(conn)
        return [r for r in rows if offerings or r["event_type"] != "VM.DYNAMIC.SCALE"]

    def quantity(self, usage_type: int, resource: str) -> dict[str, int]:
        rows = self.store.usage(T0 - 24 * HOUR, T0 + 48 * HOUR, usage_type=usage_type, resource=resource)
        out: dict[str, int] = {}
        for row in rows:
            out[row.key.account] = out.get(row.key.account, 0) + row.quantity
        return out

    def metric(self, name: str) -> str:
        text = generate_latest(self.metrics.registry).decode()
        return "\n".join(line for line in text.splitlines() if line.startswith(name))


@pytest.fixture
def rig(tmp_path: Path, double: api.CloudStackApiDouble) -> Iterator[Rig]:
    r = Rig(tmp_path, double)
    yield r
    r.store.close()


def test_cs_client_signs_and_pages(double: api.CloudStackApiDouble) -> None:
    double.cloud["listAccounts"] = [api.account(f"acct-{i:04d}", f"user{i}") for i in range(1200)]
    snapshot = CloudStackApi(double.endpoint, api.API_KEY, api.SECRET).snapshot(T0)
    assert len(snapshot.accounts) == 1200
    pages = [r["page"] for r in double.requests if r["command"] == "listAccounts"]
    assert pages == ["1", "2", "3"]
    assert all(r["apiKey"] == api.API_KEY for r in double.requests)
    # listall where the command has it (a BaseListCmd such as listVlanIpRanges has not)
    for r in double.requests:
        assert r.get("listall") == (None if r["command"] in UNSCOPED_LISTS else "true"), r["command"]
    assert double.refused == []
    with pytest.raises(ApiUnavailable, match="401"):
        CloudStackApi(double.endpoint, api.API_KEY, "wrong-secret").snapshot(T0)
    assert double.refused
    assert double.refused[-1] == "signature mismatch"


def test_lost_stop_is_corrected_once(rig: Rig, double: api.CloudStackApiDouble) -> None:
    rig.events(usage_event("VM.CREATE", VM1, ACCT_A, T0), usage_event("VM.START", VM1, ACCT_A, T0 + HOUR))
    double.cloud["listVirtualMachines"] = [api.vm(VM1, "web-1", "alice", "Stopped", "small", T0)]
    rig.run_pass()  # one witness: CloudStack alone
    assert rig.corrections() == []
    first = rig.clock.now
    rig.run_pass(hours_later=1)  # the previous pass agrees: corrected at its time
    [row] = rig.corrections()
    assert (row["event_type"], row["resource"], row["time_ms"], row["account"]) == (
        "VM.STOP",
        VM1,
        first,
        ACCT_A,
    )
    assert row["source"] == "cloudstack-api"
    assert "stop event lost" in row["reason"]
    assert rig.quantity(RUNNING_VM, VM1) == {ACCT_A: first - (T0 + HOUR)}
    assert 'event="VM.STOP"' in rig.metric("kvmeter_reconcile_corrections_total")
    for _ in range(2):  # passes run again add nothing
        rig.run_pass(hours_later=1)
    assert len(rig.corrections()) == 1
    assert rig.quantity(RUNNING_VM, VM1) == {ACCT_A: first - (T0 + HOUR)}
    # Visible in the API, with the account's name.
    client = create_app(rig.store).test_client()
    body = client.get("/v1/corrections").get_json()
    [got] = [c for c in body["corrections"] if c["event_type"] == "VM.STOP"]
    assert (got["event_type"], got["accountid"], got["account"], got["domain"]) == (
        "VM.STOP",
        ACCT_A,
        "alice",
        "ROOT",
    )
    assert client.get(f"/v1/corrections?account={ACCT_B}").get_json()["count"] == 0
    assert client.get(f"/v1/corrections?account={ACCT_A}").get_json()["count"] == body["count"]


def test_lost_start_takes_the_agents_time(rig: Rig, double: api.CloudStackApiDouble) -> None:
    rig.events(
        usage_event("VM.CREATE", VM1, ACCT_A, T0),
        usage_event("VM.START", VM1, ACCT_A, T0 + HOUR),
        usage_event("VM.STOP", VM1, ACCT_A, T0 + 2 * HOUR),
    )
    running_since = T0 + 3 * HOUR
    stream = Stream("s1", "h1")
    batch = pb.MeasureBatch.FromString(stream.batch([], poll_time=running_since))
    batch.inventory.add(uuid=VM1, name="i-2-10-VM", state=pb.RUNNING)
    rig.collector.apply_batch(batch.SerializeToString())
    double.cloud["listVirtualMachines"] = [api.vm(VM1, "web-1", "alice", "Running", "small", T0)]
    rig.run_pass()
    [row] = rig.corrections()
    assert (row["event_type"], row["time_ms"]) == ("VM.START", running_since)
    assert rig.quantity(RUNNING_VM, VM1) == {ACCT_A: HOUR + rig.clock.now - running_since}


def test_lost_ip_release(rig: Rig, double: api.CloudStackApiDouble) -> None:
    rig.events(usage_event("NET.IPASSIGN", IP1, ACCT_B, T0))
    rig.run_pass()
    released_by = rig.clock.now
    rig.run_pass(hours_later=2)
    [row] = rig.corrections()
    assert (row["event_type"], row["time_ms"], row["account"]) == ("NET.IPRELEASE", released_by, ACCT_B)
    assert rig.quantity(IP_ADDRESS, IP1) == {ACCT_B: released_by - T0}


def test_router_without_metadata_is_billed_to_its_networks_owner(
    rig: Rig, double: api.CloudStackApiDouble
) -> None:
    stream = Stream("s-router", "h1")
    measure = M(
        T0 + HOUR, T0 + HOUR + 1000, 4242, instance=ROUTER, domain=ROUTER_NAME, mac="1e:00:00:00:00:05"
    )
    rig.collector.apply_batch(stream.batch([measure]))
    assert rig.quantity(NETWORK_BYTES_SENT, ROUTER) == {}  # parked: no owner known
    double.cloud["listNetworks"] = [api.network("net-1", "alice-net", "alice")]
    double.cloud["listRouters"] = [api.router(ROUTER, ROUTER_NAME, network_id="net-1", created_ms=T0)]
    rig.run_pass()
    [row] = rig.corrections()
    assert (row["event_type"], row["account"], row["time_ms"]) == ("ROUTER.OWNER", ACCT_A, T0)
    assert rig.quantity(NETWORK_BYTES_SENT, ROUTER) == {ACCT_A: 4242}


def test_scaled_vm_without_offering_on_the_bus(rig: Rig, double: api.CloudStackApiDouble) -> None:
    scaled_at = T0 + 2 * HOUR
    rig.events(
        usage_event("VM.CREATE", VM1, ACCT_A, T0),
        usage_event("VM.START", VM1, ACCT_A, T0 + HOUR),
        usage_event("VM.DYNAMIC.SCALE", VM1, ACCT_A, scaled_at),
    )
    double.cloud["listVirtualMachines"] = [api.vm(VM1, "web-1", "alice", "Running", "small", T0)]
    rig.run_pass()  # the offering learned: the open segments are named from their start
    double.cloud["listVirtualMachines"] = [
        api.vm(VM1, "web-1", "alice", "Running", "large", T0, cpu=2, memory=2048)
    ]
    rig.run_pass(hours_later=1)
    kinds = [(r["event_type"], r["offering"], r["time_ms"]) for r in rig.corrections(offerings=True)]
    assert ("VM.DYNAMIC.SCALE", "large", scaled_at) in kinds
    rows = rig.store.usage(T0, T0 + 48 * HOUR, usage_type=RUNNING_VM, resource=VM1)
    by_offering: dict[str, int] = {}
    for r in rows:
        if r.quantity:  # the record of the unnamed offering stays, at zero
            by_offering[r.key.offering] = by_offering.get(r.key.offering, 0) + r.quantity
    assert by_offering == {"small": scaled_at - (T0 + HOUR), "large": rig.clock.now - scaled_at}


def test_custom_offering_scaled_without_an_offering_change(rig: Rig, double: api.CloudStackApiDouble) -> None:
    """scaleVirtualMachine on a custom offering: the bus says VM.DYNAMIC.SCALE and no size; the
    API's cpunumber / memory change. Records split at the event's time by the size they ran with."""
    double.cloud["listServiceOfferings"].append(api.offering("custom", "Custom", None, None))
    scaled_at = T0 + 2 * HOUR
    rig.events(usage_event("VM.CREATE", VM1, ACCT_A, T0), usage_event("VM.START", VM1, ACCT_A, T0 + HOUR))
    double.cloud["listVirtualMachines"] = [
        api.custom_vm(VM1, "web-1", "alice", "Running", "custom", T0, 1, 1024)
    ]
    rig.run_pass()  # offering and size learned from the segments' start
    rig.events(usage_event("VM.DYNAMIC.SCALE", VM1, ACCT_A, scaled_at))
    double.cloud["listVirtualMachines"] = [
        api.custom_vm(VM1, "web-1", "alice", "Running", "custom", T0, 4, 8192)
    ]
    rig.run_pass(hours_later=1)
    scale = [r for r in rig.corrections(offerings=True) if r["time_ms"] == scaled_at]
    assert [(r["event_type"], r["offering"]) for r in scale] == [("VM.DYNAMIC.SCALE", "custom")]
    for usage_type, opened in ((RUNNING_VM, T0 + HOUR), (ALLOCATED_VM, T0)):
        by_size: dict[str, int] = {}
        for r in rig.store.usage(T0, T0 + 48 * HOUR, usage_type=usage_type, resource=VM1):
            if r.quantity:
                by_size[f"{r.key.offering} {r.key.detail}"] = (
                    by_size.get(f"{r.key.offering} {r.key.detail}", 0) + r.quantity
                )
        assert by_size == {"custom 1/1024": scaled_at - opened, "custom 4/8192": rig.clock.now - scaled_at}
    body = (
        create_app(rig.store)
        .test_client()
        .get(f"/v1/usage?resource={VM1}&type={RUNNING_VM}&start={T0}&end={T0 + 48 * HOUR}")
        .get_json()
    )
    sizes = {(u["cpunumber"], u["memory"]) for u in body["usage"] if u["quantity"]}
    assert sizes == {(1, 1024), (4, 8192)}
    for _ in range(2):  # settled: passes run again add nothing
        rig.run_pass(hours_later=1)
    assert len([r for r in rig.corrections(offerings=True) if r["event_type"] == "VM.DYNAMIC.SCALE"]) == 2


@pytest.mark.parametrize("fault", ["down", "garbage"])
def test_api_down_or_nonsense_changes_nothing_and_counts_an_error(
    rig: Rig, double: api.CloudStackApiDouble, fault: str
) -> None:
    rig.events(usage_event("VM.CREATE", VM1, ACCT_A, T0), usage_event("VM.START", VM1, ACCT_A, T0 + HOUR))
    setattr(double, fault, True)
    for _ in range(3):
        rig.run_pass(hours_later=1)
    assert rig.corrections() == []
    assert (
        rig.metric("kvmeter_reconcile_errors_total")
        == 'kvmeter_reconcile_errors_total{reason="unavailable"} 3.0'
    )
    assert rig.quantity(RUNNING_VM, VM1) == {ACCT_A: rig.clock.now - (T0 + HOUR)}  # billing goes on


def test_an_api_that_sees_part_of_the_cloud_destroys_nothing(
    rig: Rig, double: api.CloudStackApiDouble
) -> None:
    for i in range(6):
        vm = f"vm-{i}"
        rig.events(usage_event("VM.CREATE", vm, ACCT_A, T0), usage_event("VM.START", vm, ACCT_A, T0 + HOUR))
    for _ in range(2):
        rig.run_pass(hours_later=1)
    assert rig.corrections() == []
    assert 'reason="implausible"' in rig.metric("kvmeter_reconcile_errors_total")


def test_a_project_vm_is_listed_and_never_destroyed(rig: Rig, double: api.CloudStackApiDouble) -> None:
    project_account = "3c5e0000-0000-4000-8000-00000000proj"
    rig.events(
        usage_event("VM.CREATE", VM1, project_account, T0),
        usage_event("VM.START", VM1, project_account, T0 + HOUR),
    )
    double.cloud["listVirtualMachines"] = [
        api.vm(VM1, "web-1", "PrjAcct-proj-1", "Running", "small", T0, project_id="proj-1")
    ]
    for _ in range(3):
        rig.run_pass(hours_later=1)
    assert rig.corrections() == []
    assert any(r.get("projectid") == "-1" for r in double.requests if r["command"] == "listVirtualMachines")
    assert rig.quantity(RUNNING_VM, VM1) == {project_account: rig.clock.now - (T0 + HOUR)}


def test_corrections_are_narrowed_to_the_callers_accounts(rig: Rig, double: api.CloudStackApiDouble) -> None:
    rig.events(usage_event("NET.IPASSIGN", IP1, ACCT_B, T0))
    rig.run_pass()
    rig.run_pass(hours_later=1)  # the release bob's IP lost on the bus
    app = create_app(rig.store)
    caller: list[Principal] = []

    @app.before_request
    def _as_caller() -> None:
        g.principal = caller[-1]

    client = app.test_client()
    for principal, query, count in [
        (Principal("bob", accounts=frozenset({ACCT_B})), "", 1),
        (Principal("alice", accounts=frozenset({ACCT_A})), "", 0),
        (Principal("operator"), f"?account={ACCT_B}", 1),
    ]:
        caller.append(principal)
        body = client.get(f"/v1/corrections{query}").get_json()
        assert body["count"] == count, (principal, query)
    caller.append(Principal("alice", accounts=frozenset({ACCT_A})))
    refused = client.get(f"/v1/corrections?account={ACCT_B}")  # another's account: refused, as on all /v1
    assert refused.status_code == 403
    assert "may not read account" in refused.get_json()["error"]


def test_a_second_replica_leaves_its_pass_out(rig: Rig, double: api.CloudStackApiDouble) -> None:
    client = CloudStackApi(double.endpoint, api.API_KEY, api.SECRET)
    other = Reconciler(rig.collector, client.snapshot, period_s=2)  # fetches every 2 s
    rig.run_pass()  # this replica kept a pass just now
    other.start()
    try:
        assert other.poll(10) == []  # fetched, and left out: passed elsewhere a moment ago
        assert other.passes == 0
        rig.clock.now += 5_000  # more than half a period later
        deadline = time.monotonic() + 10
        got: list = []
        while not got and time.monotonic() < deadline:
            got = other.poll(1)
        assert got, "no pass once the other's was old enough"
    finally:
        other.close()
