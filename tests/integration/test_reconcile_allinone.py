"""Through the front door: `kvmeter run --all-in-one --config FILE` with a [cloudstack] section
bills a virtual router that has no <metadata> and no router file to its guest network's owner,
as the CloudStack API double (reached over the lab's management network) tells."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kvmeter.collector.model import NETWORK_BYTES_RECEIVED, NETWORK_BYTES_SENT
from kvmeter.collector.store import Store, reconciliation
from tests.harness import cloudstack_api as api
from tests.harness.netns import Host, Lab
from tests.harness.processes import AllInOneProcess

pytestmark = [pytest.mark.netns, pytest.mark.libvirt]

ACCOUNT = "acc00000-0000-4000-8000-0000000000a1"
ROUTER_UUID = "a1100000-0000-4000-8000-0000000000f5"
NETWORK = "0e700000-0000-4000-8000-000000000001"


def test_all_in_one_bills_a_router_to_its_networks_owner(
    netns_lab: Lab, netns_host: Callable[..., Host], tmp_path: Path
) -> None:
    host = netns_host("rcn")
    now = int(time.time() * 1000)
    with api.CloudStackApiDouble(host=netns_lab.root_ip) as double:
        double.cloud["listAccounts"] = [api.account(ACCOUNT, "alice")]
        double.cloud["listDomains"] = [api.domain()]
        double.cloud["listNetworks"] = [api.network(NETWORK, "alice-guest", "alice")]
        double.cloud["listRouters"] = [
            api.router(ROUTER_UUID, "r-5-VM", network_id=NETWORK, created_ms=now - 60_000)
        ]
        proc = AllInOneProcess(
            host, tmp_path, poll=1.0,
            extra=f'[cloudstack]\nendpoint = "{double.endpoint}"\napi_key = "{api.API_KEY}"\n'
            f'secret_key = "{api.SECRET}"\nperiod_seconds = 1\n',
        )  # fmt: skip
        proc.events.write_bytes(b"")
        router = host.add_vm("r-5-VM", ROUTER_UUID, [("cloudbr0", "06:00:05:00:00:03", "198.51.100.5/24")])
        host.write_libvirt_xml(proc.libvirt_xml)  # no <metadata>, no router file
        proc.start()
        try:
            proc.wait_polled()
            for _ in range(5):
                router.send("198.51.100.1", 25_000, nic=0)
                time.sleep(0.5)
            time.sleep(3)  # a pass, and the last bytes polled
            assert proc.terminate() == 0, proc.logs()
        finally:
            proc.stop()
        assert double.refused == [], proc.logs()
        assert double.requests, proc.logs()
    store = Store(proc.db)
    try:
        billed = {
            (k.account, k.usage_type)
            for k, q in store.net_usage().items()
            if q
            and k.resource == ROUTER_UUID
            and k.usage_type in (NETWORK_BYTES_SENT, NETWORK_BYTES_RECEIVED)
        }
        assert (ACCOUNT, NETWORK_BYTES_SENT) in billed
        assert {account for account, _ in billed} == {ACCOUNT}
        assert store.stats(0)["parked_bytes"] == 0
        with store.read() as conn:
            rows = reconciliation.list_corrections(conn)
        assert [(r["event_type"], r["resource"], r["account"]) for r in rows] == [
            ("ROUTER.OWNER", ROUTER_UUID, ACCOUNT)
        ]
    finally:
        store.close()
