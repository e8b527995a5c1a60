"""A zone's tagged public VLANs typed `guest` by the agents' default rules: the reconciler learns
the public VLANs from CloudStack's listVlanIpRanges (the API double over HTTP, the real `cs`
client) and reports the NICs the agents place on one but type otherwise, from the inventories in
the measure batches (a real store)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from kvmeter.collector.cs_client import CloudStackApi
from kvmeter.collector.metrics import Metrics
from kvmeter.collector.model import Record, Settings
from kvmeter.collector.reconciler import Reconciler
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store
from kvmeter.proto import pb
from tests.collector_support import HOUR, T0, Clock
from tests.harness import cloudstack_api as api

GAUGE = "kvmeter_public_vlan_mistyped_nics"


class Rig:
    def __init__(self, tmp_path: Path, double: api.CloudStackApiDouble) -> None:
        self.clock = Clock(T0 + 10 * HOUR)
        self.store = Store(f"sqlite:///{tmp_path}/usage.db")
        self.store.migrate()
        self.collector = Collector(self.store, Settings(), self.clock)
        self.metrics = Metrics()
        client = CloudStackApi(double.endpoint, api.API_KEY, api.SECRET, timeout_s=5)
        self.reconciler = Reconciler(self.collector, client.snapshot, metrics=self.metrics)
        self.seq = 0

    def inventory(self, host: str, domains: dict[str, tuple[int, list[tuple[int, int]]]]) -> None:
        """One batch of `host` carrying the inventory {domain name: (state, [(vlan, type)])}."""
        self.seq += 1
        b = pb.MeasureBatch(schema=1, host_id=host, boot_id=f"boot-{host}", stream_id=f"s-{host}",
                            seq=self.seq, poll_time=self.clock.now)  # fmt: skip
        for name, (state, nics) in domains.items():
            dom = b.inventory.add(name=name, uuid=f"uuid-{name}", state=state)
            for i, (vlan, traffic) in enumerate(nics):
                dom.nics.add(
                    mac=f"02:00:00:00:00:{i:02x}", device=f"vnet{i}", vlan_id=vlan, traffic_type=traffic
                )
        self.collector.apply_batches([Record(b.SerializeToString(), None, f"t/{self.seq}")])

    def run_pass(self) -> None:
        snapshot = self.reconciler.fetch()
        assert snapshot is not None, self.reconciler.last_error
        self.reconciler.apply(snapshot)

    def gauge(self) -> dict[tuple[str, str, str], float]:
        out = {}
        for family in self.metrics.registry.collect():
            for s in family.samples:
                if s.name == GAUGE:
                    out[s.labels["host"], s.labels["vlan"], s.labels["traffic_type"]] = s.value
        return out


@pytest.fixture
def double() -> api.CloudStackApiDouble:
    with api.CloudStackApiDouble() as d:
        d.cloud["listDomains"] = [api.domain()]
        yield d


def public_ranges(double: api.CloudStackApiDouble) -> None:
    double.cloud["listVlanIpRanges"] = [
        api.vlan_range("r-pub", "vlan://100"),
        api.vlan_range("r-pub-old", "101"),  # releases before vlan:// URIs
        api.vlan_range("r-untagged", "untagged"),
        api.vlan_range("r-shared", "vlan://300", public=False),  # a shared guest network's range
    ]


def test_nics_on_a_public_vlan_typed_guest_are_reported(
    tmp_path: Path, double: api.CloudStackApiDouble, caplog: pytest.LogCaptureFixture
) -> None:
    """A pass reads listVlanIpRanges (without listall, a parameter it has not) and reports, per
    host, VLAN and type, the NICs an agent placed on a public VLAN ("vlan://100" or "101") but
    typed otherwise: a warning naming host, VLAN and the agent's `vlan` rule, and the gauge
    kvmeter_public_vlan_mistyped_nics. NICs typed public there, NICs on a guest VLAN or on a
    shared network's VLAN, are not reported."""
    public_ranges(double)
    rig = Rig(tmp_path, double)
    rig.inventory("kvm-1", {
        "i-2-10-VM": (pb.RUNNING, [(100, pb.GUEST), (200, pb.GUEST)]),
        "i-2-11-VM": (pb.RUNNING, [(100, pb.GUEST), (300, pb.GUEST)]),
        "r-5-VM": (pb.RUNNING, [(101, pb.GUEST)]),
    })  # fmt: skip
    rig.inventory("kvm-2", {"i-2-12-VM": (pb.RUNNING, [(100, pb.PUBLIC), (101, pb.TRAFFIC_UNKNOWN)])})
    with caplog.at_level(logging.WARNING, logger="kvmeter.collector.reconciler"):
        rig.run_pass()
    [asked] = [r for r in double.requests if r.get("command") == "listVlanIpRanges"]
    assert "listall" not in asked  # no such parameter: CloudStack would warn of it every pass
    assert rig.gauge() == {
        ("kvm-1", "100", "guest"): 2,
        ("kvm-1", "101", "guest"): 1,
        ("kvm-2", "101", "unknown"): 1,
    }
    warned = [r.getMessage() for r in caplog.records if "public VLAN" in r.getMessage()]
    assert len(warned) == 3, warned
    line = next(w for w in warned if "kvm-1" in w and "VLAN 100" in w)
    assert "'guest'" in line
    assert 'vlan = "100" type = "public"' in line
    assert "zone(s) zone-1" in line  # the advice holds for that zone's hosts only
    assert (
        f'{GAUGE}{{host="kvm-1",traffic_type="guest",vlan="100"}} 2.0'
        in generate_latest(rig.metrics.registry).decode()
    )


def test_a_fixed_or_stopped_placement_stops_being_reported(
    tmp_path: Path, double: api.CloudStackApiDouble, caplog: pytest.LogCaptureFixture
) -> None:
    """The warning is given once while a placement stays mistyped, not every pass; once the
    agent types the VLAN public (its rule added) or the domain stops, the gauge's series goes."""
    public_ranges(double)
    rig = Rig(tmp_path, double)
    rig.inventory(
        "kvm-1", {"i-2-10-VM": (pb.RUNNING, [(100, pb.GUEST)]), "r-5-VM": (pb.RUNNING, [(100, pb.GUEST)])}
    )
    with caplog.at_level(logging.WARNING, logger="kvmeter.collector.reconciler"):
        rig.run_pass()
        rig.run_pass()
    assert rig.gauge() == {("kvm-1", "100", "guest"): 2}
    assert sum("public VLAN" in r.getMessage() for r in caplog.records) == 1
    rig.inventory("kvm-1", {"i-2-10-VM": (pb.RUNNING, [(100, pb.PUBLIC)]), "r-5-VM": (pb.SHUTOFF, [])})
    rig.run_pass()
    assert rig.gauge() == {}
    assert "kvmeter_public_vlan_mistyped_nics{" not in generate_latest(rig.metrics.registry).decode()


def test_a_replica_that_leaves_its_pass_out_still_reports_its_hosts(
    tmp_path: Path, double: api.CloudStackApiDouble
) -> None:
    """Replicas share the measure partitions, so each knows only its hosts' inventories: a replica
    that leaves its pass out (another kept one a moment ago) still checks its own NICs against the
    API it fetched, else its hosts' mistyped public VLANs would go unreported."""
    public_ranges(double)
    rig = Rig(tmp_path, double)  # the replica that keeps the passes, reading no host of these
    rig.run_pass()
    other = Collector(rig.store, Settings(), rig.clock)
    metrics = Metrics()
    client = CloudStackApi(double.endpoint, api.API_KEY, api.SECRET, timeout_s=5)
    replica = Reconciler(other, client.snapshot, period_s=60, metrics=metrics)
    batch = pb.MeasureBatch(
        schema=1, host_id="kvm-9", boot_id="b9", stream_id="s-9", seq=1, poll_time=rig.clock.now
    )
    batch.inventory.add(name="i-2-20-VM", uuid="u-20", state=pb.RUNNING).nics.add(
        mac="02:00:00:00:00:20", device="vnet0", vlan_id=100, traffic_type=pb.GUEST
    )
    other.apply_batches([Record(batch.SerializeToString(), None, "t/9")])
    replica.start()
    try:
        assert replica.poll(10) == []  # fetched, and left out: passed elsewhere a moment ago
    finally:
        replica.close()
    assert replica.passes == 0
    series = {
        (s.labels["host"], s.labels["vlan"], s.labels["traffic_type"]): s.value
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name == GAUGE
    }
    assert series == {("kvm-9", "100", "guest"): 1}
