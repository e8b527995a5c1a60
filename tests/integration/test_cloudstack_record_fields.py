"""UsageRecordResponse's fields as the real `cs` client reads them, JSON and XML: what the
reconciler's last pass read of VMs, routers, networks, addresses and offerings fills the fields
CloudStack would set (offering name in the description, cpunumber and memory of the record's
offering, a router's networkid or vpcid and network name, zones); what kvmeter does not know is
left out, as Gson leaves out nulls."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cs import CloudStack, CloudStackApiException

from kvmeter.collector.api import serve
from kvmeter.collector.credentials import Credentials, CredentialSource, Grant
from kvmeter.collector.cs_snapshot import (
    LISTS,
    Account,
    Domain,
    Network,
    Offering,
    PublicIp,
    Router,
    Snapshot,
    Vm,
    parse_snapshot,
    snapshot_from_json,
    snapshot_to_json,
)
from kvmeter.collector.model import UsageKey
from kvmeter.collector.store import Store
from kvmeter.collector.store.reconciliation import save_names, save_snapshot
from tests.api_support import running
from tests.collector_support import ACCT_A, HOUR, IP1, ROUTER, T0, VM1, VM2, ZONE

KEY, SECRET = "billing-key", "billing-secret"
DOMAIN, NET, VPC = "d-root", "n-web", "vpc-1"
ROUTER2 = "9b1f0000-0000-4000-8000-00000router2"
SMALL, CUSTOM = "so-small", "so-custom"  # a fixed and a custom (dynamic) service offering
TEMPLATE = "tmpl-debian"
NOW = T0 + 3 * HOUR
SNAPSHOT = Snapshot(
    taken_ms=NOW,
    vms={
        VM1: Vm(
            VM1,
            "web-1",
            "Running",
            "alice",
            DOMAIN,
            "",
            SMALL,
            4,
            4096,
            T0,
            ZONE,
            template=TEMPLATE,
            cpu_speed=2000,
        )
    },
    routers={
        ROUTER: Router(ROUTER, "r-7-VM", "Running", "", VPC, T0),  # a VPC's router
        ROUTER2: Router(ROUTER2, "r-9-VM", "Running", NET, "", T0),  # an isolated network's
    },
    networks={NET: Network(NET, "web-net", "alice", DOMAIN, "", "")},
    ips={IP1: PublicIp(IP1, "203.0.113.5", "Allocated", "alice", DOMAIN, "", T0, ZONE)},
    accounts={ACCT_A: Account(ACCT_A, "alice", DOMAIN)},
    domains={DOMAIN: Domain(DOMAIN, "ROOT", "ROOT")},
    offerings={
        SMALL: Offering(SMALL, "Small Instance", 2, 2048, cpu_speed=1000),
        CUSTOM: Offering(CUSTOM, "Custom", 1, 512, customized=True),
    },
)


def key(usage_type: int, resource: str, offering: str = "", detail: str = "") -> UsageKey:
    return UsageKey(ACCT_A, usage_type, resource, offering, detail, T0, T0 + HOUR)


@pytest.fixture
def cs(tmp_path: Path) -> Iterator[CloudStack]:
    store = Store(f"sqlite:///{tmp_path}/usage.db")
    store.migrate()
    running_vm, allocated = key(1, VM1, SMALL), key(2, VM1, CUSTOM)
    resized = key(1, VM2, CUSTOM, detail="8/16384")  # a custom offering's VM: its own size
    ip = key(3, IP1)
    bytes_ = {key(4, VM1, detail="public"): 100, key(4, ROUTER, detail="public"): 200,
              key(5, ROUTER2, detail="guest"): 300}  # fmt: skip
    devices = {key(4, VM1, detail="public"): ("i-2-10-VM", "UserVm"),
               key(4, ROUTER, detail="public"): ("r-7-VM", "DomainRouter"),
               key(5, ROUTER2, detail="guest"): ("r-9-VM", "DomainRouter")}  # fmt: skip
    with store.write() as conn:
        store.lock_resources(conn, [VM1, VM2, IP1])
        times = {VM1: {running_vm: HOUR // 2, allocated: HOUR}, IP1: {ip: HOUR}, VM2: {resized: HOUR}}
        store.set_time_values_many(conn, times, 0, NOW)
        store.add_bytes(conn, bytes_, devices, 0, NOW)
        save_names(conn, SNAPSHOT, NOW)
        save_snapshot(conn, SNAPSHOT, NOW)
    credentials = CredentialSource(Credentials(keys={KEY: (SECRET, Grant("billing"))}))
    with running(serve(store, "127.0.0.1", 0, credentials=credentials)) as url:
        yield CloudStack(endpoint=f"{url}/client/api", key=KEY, secret=SECRET)
    store.close()


RANGE = {"startdate": "2024-05-14", "enddate": "2024-05-14"}
OWNER = {"account": "alice", "accountid": ACCT_A, "domainid": DOMAIN, "domain": "ROOT", "domainpath": "ROOT"}
DATES = {"startdate": "2024-05-14T09:00:00+0000", "enddate": "2024-05-14T09:59:59+0000"}
EXPECTED: dict[tuple[int, str], dict[str, Any]] = {
    (1, VM1): {
        **OWNER, "zoneid": ZONE,
        "description": f"Running VM usage for web-1 ({VM1}) using service offering Small Instance ({SMALL})",
        "usage": "0.5 Hrs", "usagetype": 1, "rawusage": "0.5", "virtualmachineid": VM1, "name": "web-1",
        "offeringid": SMALL, "templateid": TEMPLATE, "usageid": VM1, "type": "KVM", "cpunumber": 2,
        "cpuspeed": 1000, "memory": 2048,  # the offering's
        **DATES, "tags": [],
    },
    (2, VM1): {
        **OWNER, "zoneid": ZONE,
        "description": f"Allocated VM usage for web-1 ({VM1}) using service offering Custom ({CUSTOM})",
        "usage": "1 Hrs", "usagetype": 2, "rawusage": "1", "virtualmachineid": VM1, "name": "web-1",
        "offeringid": CUSTOM, "templateid": TEMPLATE, "usageid": VM1, "type": "KVM", "cpunumber": 4,
        "cpuspeed": 2000, "memory": 4096,  # the VM's
        **DATES, "tags": [],
    },
    (1, VM2): {
        **OWNER,
        "description": f"Running VM usage for {VM2} ({VM2}) using service offering Custom ({CUSTOM})",
        "usage": "1 Hrs", "usagetype": 1, "rawusage": "1", "virtualmachineid": VM2, "offeringid": CUSTOM,
        "usageid": VM2, "type": "KVM", "cpunumber": 8, "memory": 16384, **DATES, "tags": [],  # the record's
    },
    (3, IP1): {
        **OWNER, "zoneid": ZONE, "description": f"IP address usage for 203.0.113.5 ({IP1})",
        "usage": "1 Hrs", "usagetype": 3, "rawusage": "1", "usageid": IP1, **DATES, "tags": [],
    },
    (4, VM1): {
        **OWNER, "zoneid": ZONE, "description": f"Bytes sent by i-2-10-VM ({VM1}) on public traffic",
        "usage": "100 bytes sent", "usagetype": 4, "rawusage": "100", "virtualmachineid": VM1,
        "usageid": VM1, "type": "UserVm", **DATES, "tags": [],
    },
    (4, ROUTER): {
        **OWNER, "description": f"Bytes sent by r-7-VM ({ROUTER}) on public traffic",
        "usage": "200 bytes sent", "usagetype": 4, "rawusage": "200", "usageid": ROUTER,
        "type": "DomainRouter", **DATES, "vpcid": VPC, "tags": [],  # a VPC's public traffic: the VPC
    },
    (5, ROUTER2): {
        **OWNER,
        "description": f"Bytes received by r-9-VM ({ROUTER2}) on guest traffic of network web-net ({NET})",
        "usage": "300 bytes received", "usagetype": 5, "rawusage": "300", "name": "web-net",
        "usageid": ROUTER2, "type": "DomainRouter", **DATES, "networkid": NET, "tags": [],
    },
}  # fmt: skip


def test_json_records_carry_every_field_kvmeter_knows_in_cloudstacks_order(cs: CloudStack) -> None:
    records = cs.listUsageRecords(**RANGE, fetch_list=True)
    by_key = {(r["usagetype"], r["usageid"]): r for r in records}
    assert set(by_key) == set(EXPECTED)
    for k, expected in EXPECTED.items():
        assert by_key[k] == expected, k
        assert list(by_key[k]) == list(expected), k  # UsageRecordResponse's field order


def test_xml_records_carry_the_same_fields(cs: CloudStack) -> None:
    text = cs.listUsageRecords(**RANGE, json=False)  # no response=json: CloudStack's XML
    root = ET.fromstring(text)
    assert (root.tag, root.findtext("count")) == ("listusagerecordsresponse", str(len(EXPECTED)))
    for rec in root.findall("usagerecord"):
        fields = [(child.tag, child.text) for child in rec]
        expected = EXPECTED[(int(rec.findtext("usagetype") or 0), rec.findtext("usageid") or "")]
        assert fields == [(k, str(v)) for k, v in expected.items() if k != "tags"]  # no tags: no element


def test_the_reconcilers_snapshot_keeps_template_and_cpu_speed() -> None:
    raw = {command: [] for command in LISTS}
    raw["listVirtualMachines"] = [{"id": VM1, "templateid": TEMPLATE, "cpuspeed": 2000, "cpunumber": 4}]
    raw["listServiceOfferings"] = [{"id": SMALL, "name": "Small Instance", "cpunumber": 2, "cpuspeed": 1000}]
    snapshot = parse_snapshot(raw, NOW)
    assert (snapshot.vms[VM1].template, snapshot.vms[VM1].cpu_speed) == (TEMPLATE, 2000)
    assert snapshot.offerings[SMALL].cpu_speed == 1000
    assert snapshot_from_json(snapshot_to_json(snapshot)) == snapshot
    kept = json.loads(snapshot_to_json(snapshot))  # a snapshot kept before these fields existed
    del kept["vms"][VM1]["template"], kept["vms"][VM1]["cpu_speed"], kept["offerings"][SMALL]["cpu_speed"]
    older = snapshot_from_json(json.dumps(kept))
    assert (older.vms[VM1].template, older.vms[VM1].cpu_speed, older.offerings[SMALL].cpu_speed) == (
        "",
        None,
        None,
    )


def test_the_cs_client_reads_cloudstacks_431_for_an_account_that_does_not_exist(cs: CloudStack) -> None:
    with pytest.raises(CloudStackApiException) as refused:  # JSON
        cs.listUsageRecords(**RANGE, accountid="no-such-account")
    error = refused.value.error
    assert (error["errorcode"], error["cserrorcode"]) == (431, 9999)
    assert "Invalid parameter accountid value=no-such-account" in error["errortext"]
    with pytest.raises(CloudStackApiException) as refused:  # XML, CloudStack's default
        cs.listUsageRecords(**RANGE, account="carol", domainid=DOMAIN, json=False)
    root = ET.fromstring(refused.value.error)
    assert (root.findtext("errorcode"), root.findtext("cserrorcode")) == ("431", "4350")
    assert root.findtext("errortext") == f"Unable to find account carol in domain {DOMAIN}"
