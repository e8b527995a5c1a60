"""Through the front door: `kvmeter collector --config FILE` with a [cloudstack] section pointing
at the CloudStack API double corrects a lost STOP (lifecycle from a real broker), and shows it
in /v1/corrections and the metrics; and it reports an agent's NICs on a public VLAN
(listVlanIpRanges) typed guest in /metrics."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from kvmeter.proto import pb
from tests.collector_support import ACCT_A, HOUR, VM1, usage_event
from tests.harness import cloudstack_api as api
from tests.harness.kafka import create_topic
from tests.harness.ports import free_port
from tests.integration.test_collector_api_front import CollectorProcess, collectors  # noqa: F401 (fixture)
from tests.integration.test_consume_live import produce, wait_for

pytestmark = pytest.mark.broker


def get(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        return resp.read()


def test_collector_applies_a_correction_from_the_api(
    kafka_bootstrap: str,
    unique_topic: Callable[..., str],
    tmp_path: Path,
    collectors: list[CollectorProcess],  # noqa: F811
) -> None:
    start = (int(time.time() * 1000) // HOUR - 1) * HOUR
    lifecycle = unique_topic("l")
    produce(kafka_bootstrap, lifecycle, [
        usage_event("VM.CREATE", VM1, ACCT_A, start), usage_event("VM.START", VM1, ACCT_A, start + 60_000),
    ])  # fmt: skip
    # An agent's batch: a running VM's NIC on VLAN 100, typed guest (the defaults' br<pif>-100)
    batch = pb.MeasureBatch(schema=1, host_id="kvm-1", boot_id="b-1", stream_id="s-1", seq=1, poll_time=start)
    batch.inventory.add(name="i-2-12-VM", uuid="u-12", state=pb.RUNNING).nics.add(
        mac="02:00:00:00:00:01", device="vnet0", vlan_id=100, traffic_type=pb.GUEST
    )
    create_topic(kafka_bootstrap, f"m-{tmp_path.name}")
    produce(kafka_bootstrap, f"m-{tmp_path.name}", [(b"kvm-1", batch.SerializeToString())])
    (tmp_path / "cs-keys.toml").write_text(f'api_key = "{api.API_KEY}"\nsecret_key = "{api.SECRET}"\n')
    port = free_port()
    with api.CloudStackApiDouble() as double:
        double.cloud["listAccounts"] = [api.account(ACCT_A, "alice")]
        double.cloud["listDomains"] = [api.domain()]
        double.cloud["listVirtualMachines"] = [api.vm(VM1, "web-1", "alice", "Stopped", "small", start)]
        double.cloud["listVlanIpRanges"] = [api.vlan_range("r-pub", "vlan://100")]
        extra = f"""
[cloudstack]
endpoint = "{double.endpoint}"
key_file = "cs-keys.toml"
period_seconds = 0.5
timeout_seconds = 5
"""
        c = CollectorProcess(
            tmp_path, kafka_bootstrap, f'listen = "127.0.0.1:{port}"', extra=extra, lifecycle_topic=lifecycle
        )
        collectors.append(c)
        stops: list[dict] = []

        def corrected() -> bool:
            try:
                body = json.loads(get(port, "/v1/corrections"))
            except OSError:
                return False
            stops[:] = [r for r in body["corrections"] if r["event_type"] == "VM.STOP"]
            return bool(stops)

        wait_for(corrected, 60, f"a VM.STOP correction; log:\n{c.log()}")
        mistyped = 'kvmeter_public_vlan_mistyped_nics{host="kvm-1",traffic_type="guest",vlan="100"} 1.0'
        wait_for(lambda: mistyped in get(port, "/metrics").decode(), 30, f"the public VLAN; log:\n{c.log()}")
        assert double.refused == []
        assert double.requests
    [stop] = stops
    assert (stop["resource"], stop["accountid"], stop["account"], stop["source"]) == (
        VM1,
        ACCT_A,
        "alice",
        "cloudstack-api",
    )
    usage = json.loads(
        get(port, f"/v1/usage?start={start - HOUR}&end={start + 3 * HOUR}&type=1&resource={VM1}")
    )
    assert sum(r["quantity"] for r in usage["usage"]) == stop["time_ms"] - (start + 60_000)
    metrics = get(port, "/metrics").decode()
    assert 'kvmeter_reconcile_corrections_total{event="VM.STOP"} 1.0' in metrics
