"""/client/api as CloudStack answers it: every listUsageRecords parameter honoured or refused with
CloudStack's code, paging with BaseListCmd's rules, XML by default, POST forms, listUsageTypes,
and every read narrowed to the caller's accounts.

The store is filled through the collector's own paths (ingest of the shared scenario, owner hints
as the agents' inventories bring them); requests go through the Flask app. The expected codes,
texts and shapes are CloudStack's (ListUsageRecordsCmd, BaseListCmd, UsageServiceImpl,
ApiResponseSerializer, ApiErrorCode in apache/cloudstack).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from kvmeter.collector.api_errors import MAX_BODY_BYTES
from kvmeter.collector.cloudstack_render import cloudstack_date
from kvmeter.collector.cs_snapshot import Account, Domain, Snapshot
from kvmeter.collector.model import UsageKey
from kvmeter.collector.store import Store
from kvmeter.collector.store.reconciliation import save_names
from tests.api_support import NOW, filled_store, scoped_app
from tests.collector_support import (
    ACCT_A,
    ACCT_B,
    HOUR,
    IP1,
    T0,
    VM1,
    VM2,
    ZONE,
    expected_usage,
)

DOMAIN_A, DOMAIN_B, PROJECT_B = (
    "d0000000-0000-4000-8000-00000000dom-a",
    "d0000000-0000-4000-8000-00000000dom-b",
    "p-b",
)
HINTS = {
    VM1: {"instanceUuid": VM1, "ownerAccountUuid": ACCT_A, "ownerAccountName": "alice",
          "ownerDomainUuid": DOMAIN_A, "ownerDomainName": "ROOT", "ownerProjectUuid": "unknown",
          "zoneUuid": ZONE, "cpuCores": "2", "memory": "2048", "tag[0].key": "env", "tag[0].value": "prod"},
    VM2: {"instanceUuid": VM2, "ownerAccountUuid": ACCT_B, "ownerAccountName": "bob",
          "ownerDomainUuid": DOMAIN_B, "ownerDomainName": "customers", "ownerProjectUuid": PROJECT_B,
          "ownerProjectName": "web"},
}  # fmt: skip
DAY = {"command": "listUsageRecords", "startdate": "2024-05-14", "enddate": "2024-05-14", "response": "json"}
EXPECTED = expected_usage(NOW)  # every window lies in 2024-05-14


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s, _ = filled_store(tmp_path)
    with s.write() as conn:
        s.save_owner_hints(conn, HINTS, NOW)
    yield s
    s.close()


@pytest.fixture
def client(store: Store) -> FlaskClient:
    return scoped_app(store).test_client()


def call(client: FlaskClient, accounts: str | None = None, **params: str) -> tuple[int, dict[str, Any]]:
    headers = {"X-Test-Accounts": accounts} if accounts is not None else {}
    resp = client.get("/client/api", query_string=params, headers=headers)
    assert resp.content_type.startswith("application/json"), resp.data
    return resp.status_code, json.loads(resp.data)


def records(body: dict[str, Any]) -> list[dict[str, Any]]:
    (inner,) = body.values()
    return list(inner.get("usagerecord", []))


Key = tuple[str, int, str, str]  # account, usage type, resource, start date


def keys(body: dict[str, Any]) -> set[Key]:
    return {(r["accountid"], r["usagetype"], r["usageid"], r["startdate"]) for r in records(body)}


def expected_keys(**match: Any) -> set[Key]:
    fields = ("account", "usage_type", "resource")
    return {
        (*k[:3], cloudstack_date(k[4]))
        for k in EXPECTED
        if all(k[fields.index(f)] == v for f, v in match.items())
    }


# (extra parameters, status, errortext part or the expected (account, type, resource) set)
CASES: list[tuple[dict[str, str], int, str | set[Key]]] = [
    ({}, 200, expected_keys()),
    ({"startdate": ""}, 431, "due to missing parameter startdate"),
    ({"enddate": "2024-13-01"}, 431, "Unable to parse date 2024-13-01 for command listusagerecords"),
    ({"startdate": "２０２４-05-14"}, 431, "Unable to parse date"),
    ({"startdate": "٢٠٢٤-05-14"}, 431, "Unable to parse date"),  # strptime would take these
    ({"startdate": "2024-5-14"}, 431, "Unable to parse date"),
    ({"type": "٣"}, 431, "for parameter type"),  # int() would take these
    ({"type": " 4"}, 431, "for parameter type"),
    ({"type": "0_4"}, 431, "for parameter type"),
    ({"startdate": "2024-05-14T00:00:00Z"}, 431, "Unable to parse date"),
    ({"startdate": "2024-05-15"}, 431, "Incorrect Date Range"),
    ({"type": "4"}, 200, expected_keys(usage_type=4)),
    ({"type": "6"}, 200, set()),
    ({"type": "bytes"}, 431, "due to invalid value bytes for parameter type"),
    ({"type": "9" * 20}, 431, "for parameter type"),
    ({"usageid": VM2}, 431, "Usageid must be specified together with usageType"),
    ({"usageid": VM2, "type": "1"}, 200, expected_keys(usage_type=1, resource=VM2)),
    ({"usageid": "no-such-vm", "type": "1"}, 200, set()),
    ({"accountid": ACCT_A}, 200, expected_keys(account=ACCT_A)),
    ({"accountid": "no-such-account"}, 200, set()),
    ({"accountid": "bad id"}, 431, "Invalid parameter accountid value=bad id"),
    ({"account": "alice"}, 200, expected_keys(account=ACCT_A)),
    ({"account": ACCT_B}, 200, expected_keys(account=ACCT_B)),  # the bus knows uuids
    ({"account": "carol"}, 200, set()),
    ({"account": "alice", "domainid": DOMAIN_A}, 200, expected_keys(account=ACCT_A)),
    ({"account": "alice", "domainid": DOMAIN_B}, 200, set()),
    ({"domainid": DOMAIN_B}, 200, expected_keys(account=ACCT_B)),
    ({"domainid": DOMAIN_B, "isrecursive": "true"}, 431, "needs the domain's path"),
    ({"domainid": DOMAIN_B, "accountid": ACCT_B, "isrecursive": "true"}, 200, expected_keys(account=ACCT_B)),
    ({"isrecursive": "true"}, 200, expected_keys()),
    ({"isrecursive": "yes"}, 431, "due to invalid value yes for parameter isrecursive"),
    ({"projectid": PROJECT_B}, 200, expected_keys(account=ACCT_B)),
    ({"projectid": "p-none"}, 200, set()),
    (
        {"projectid": PROJECT_B, "accountid": ACCT_B},
        431,
        "Projectid and accountId can't be specified together",
    ),
    (
        {"keyword": "i-3-11"},
        200,
        expected_keys(usage_type=4, resource=VM2),
    ),  # the name the agent saw for VM2's bytes
    ({"keyword": VM1[-8:].upper(), "type": "3"}, 200, set()),
    ({"keyword": "%"}, 200, set()),  # a LIKE wildcard is a plain character here
    ({"includetags": "true", "accountid": ACCT_A}, 200, expected_keys(account=ACCT_A)),
    ({"includetags": "1"}, 431, "for parameter includetags"),
    ({"oldformat": "true"}, 200, expected_keys()),
    ({"oldformat": "maybe"}, 431, "for parameter oldformat"),
    ({"page": "1"}, 431, '"pagesize" parameter is required when "page" is specified'),
    ({"pagesize": "5"}, 431, '"page" parameter is required when "pagesize" is specified'),
    ({"page": "1", "pagesize": "501"}, 431, "Page size can't exceed max allowed page size value: 500"),
    ({"page": "1", "pagesize": "-1"}, 431, "Can't specify page parameter when pagesize is -1"),
    ({"pagesize": "-1"}, 200, expected_keys()),
    ({"page": "1", "pagesize": "-2"}, 431, "for parameter pagesize"),
    ({"page": "x", "pagesize": "5"}, 431, "for parameter page"),
    ({"page": "1", "pagesize": "99999999999"}, 431, "for parameter pagesize"),
    ({"startdate": "2024-05-14 10:00:00", "enddate": "2024-05-14 10:00:00"}, 200, set()),  # start = end
]


@pytest.mark.parametrize(("extra", "status", "expected"), CASES, ids=[json.dumps(c[0]) for c in CASES])
def test_every_parameter_is_honoured_or_refused_with_cloudstacks_code(
    client: FlaskClient, extra: dict[str, str], status: int, expected: str | set[Key]
) -> None:
    code, body = call(client, **{**DAY, **extra})
    assert code == status, body
    if isinstance(expected, str):
        error = body["listusagerecordsresponse"]
        assert error["errorcode"] == status
        assert expected in error["errortext"]
        return
    assert keys(body) == expected
    assert body["listusagerecordsresponse"].get("count", 0) == len(expected)


def test_records_carry_what_cloudstack_and_the_vms_metadata_told(client: FlaskClient) -> None:
    _, body = call(client, **DAY, accountid=ACCT_A, includetags="true")
    running = next(r for r in records(body) if r["usagetype"] == 1)
    order = ["account", "accountid", "domainid", "domain", "zoneid", "description", "usage", "usagetype"]
    assert list(running)[:8] == order
    assert (running["account"], running["domainid"], running["domain"]) == ("alice", DOMAIN_A, "ROOT")
    assert (running["zoneid"], running["cpunumber"], running["memory"]) == (ZONE, 2, 2048)
    assert (running["type"], running["virtualmachineid"], running["usageid"]) == ("KVM", VM1, VM1)
    assert running["tags"] == [{"key": "env", "value": "prod", "resourcetype": "UserVm", "resourceid": VM1}]
    assert running["description"].startswith("Running VM usage for ")
    assert (running["rawusage"], running["usage"]) == ("0.5", "0.5 Hrs")
    _, body = call(client, **DAY, accountid=ACCT_B, type="4")
    (sent,) = records(body)
    assert (sent["account"], sent["projectid"], sent["project"]) == ("bob", PROJECT_B, "web")
    assert (sent["usage"], sent["rawusage"], sent["type"]) == ("3000 bytes sent", "3000", "UserVm")
    assert sent["tags"] == []  # CloudStack's empty tag set, without includetags
    _, old = call(client, **DAY, accountid=ACCT_A, type="1", oldformat="true")
    assert records(old)[0]["description"].endswith(
        "running time (ServiceOffering: unknown) (Template: unknown)"
    )


def test_xml_is_the_default_and_follows_cloudstacks_serializer(client: FlaskClient) -> None:
    params = {k: v for k, v in DAY.items() if k != "response"}
    resp = client.get("/client/api", query_string={**params, "accountid": ACCT_B, "type": "4"})
    assert resp.status_code == 200
    assert resp.content_type == "text/xml; charset=UTF-8"
    assert resp.data.startswith(
        b'<?xml version="1.0" encoding="UTF-8"?><listusagerecordsresponse cloud-stack-version='
    )
    root = ET.fromstring(resp.data)
    assert root.findtext("count") == "1"
    (rec,) = root.findall("usagerecord")
    assert (rec.findtext("accountid"), rec.findtext("usagetype"), rec.findtext("rawusage")) == (
        ACCT_B,
        "4",
        "3000",
    )
    assert rec.findtext("startdate") == "2024-05-14T11:00:00+0000"
    assert rec.find("tags") is None  # an empty collection writes nothing
    empty = ET.fromstring(client.get("/client/api", query_string={**params, "type": "6"}).data)
    assert (empty.tag, list(empty)) == ("listusagerecordsresponse", [])  # count 0 is left out
    error = client.get("/client/api", query_string={**params, "type": "x"})
    assert (error.status_code, error.content_type) == (431, "text/xml; charset=UTF-8")
    root = ET.fromstring(error.data)
    assert (root.tag, root.findtext("errorcode"), root.findtext("cserrorcode")) == (
        "listusagerecordsresponse", "431", "9999",
    )  # fmt: skip
    assert "parameter type" in (root.findtext("errortext") or "")
    assert client.get("/client/api", query_string={**params, "response": "JSON"}).content_type.startswith(
        "application/json"
    )


def test_json_shapes_of_empty_lists_and_pages_past_the_end(client: FlaskClient) -> None:
    assert call(client, **DAY, type="6") == (200, {"listusagerecordsresponse": {}})
    total = len(EXPECTED)
    assert call(client, **DAY, page="9", pagesize="500") == (
        200,
        {"listusagerecordsresponse": {"count": total}},
    )


def test_listusagetypes_and_unknown_commands(client: FlaskClient) -> None:
    code, body = call(client, command="listUsageTypes", response="json")
    assert code == 200
    types = body["listusagetypesresponse"]
    assert types["count"] == 5
    assert types["usagetype"][3] == {
        "id": 4,
        "name": "NETWORK_BYTES_SENT",
        "description": "Network Usage (Bytes Sent)",
    }
    for command in ("deployVirtualMachine", "listusagerecords", ""):
        code, body = call(client, command=command, response="json")
        assert code == 432
        assert (
            body["errorresponse"]["errortext"]
            == "The given command does not exist or it is not available for user"
        )
    code, body = call(client, **DAY, type="1", TYPE="2")
    assert (code, body["listusagerecordsresponse"]["errorcode"]) == (431, 431)


def fill_many(store: Store, n: int) -> list[UsageKey]:
    """n byte records of one account through the store's write path, one per 10-minute window."""
    added = {UsageKey(ACCT_A, 5, f"vm-{i:04d}", "", "guest", T0 + i * 600_000, T0 + (i + 1) * 600_000): i + 1
             for i in range(n)}  # fmt: skip
    with store.write() as conn:
        store.add_bytes(conn, added, {}, 0, NOW)
    return sorted(added, key=lambda k: k.window_start_ms)


def test_paging_default_500_count_is_the_total_and_pages_tile_the_answer(store: Store) -> None:
    fill_many(store, 1200)
    client = scoped_app(store).test_client()
    week = {**DAY, "enddate": "2024-05-22", "type": "5", "accountid": ACCT_A}
    total = 1200 + 1  # and the scenario's one received-bytes record
    _, first = call(client, **week)
    assert first["listusagerecordsresponse"]["count"] == total
    assert len(records(first)) == 500
    seen = []
    for page in range(1, 5):
        _, body = call(client, **week, page=str(page), pagesize="500")
        assert body["listusagerecordsresponse"]["count"] == total
        seen += records(body)
    assert len(seen) == total
    assert seen[:500] == records(first)
    assert len({(r["usageid"], r["startdate"]) for r in seen}) == total
    starts = [r["startdate"] for r in seen]
    assert starts == sorted(starts)
    _, everything = call(client, **week, pagesize="-1")
    assert records(everything) == seen
    _, small = call(client, **week, page="3", pagesize="7")
    assert records(small) == seen[14:21]


def test_post_with_a_form_body_is_a_request_like_get(client: FlaskClient) -> None:
    resp = client.post("/client/api", data={**DAY, "accountid": ACCT_B, "type": "4"})
    assert resp.status_code == 200
    assert keys(json.loads(resp.data)) == expected_keys(usage_type=4, resource=VM2)
    assert client.put("/client/api", data=DAY).status_code == 405


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        ({}, 200),
        ({"accountid": ACCT_A}, 200),
        ({"account": "alice"}, 200),
        ({"domainid": DOMAIN_A}, 200),
        ({"accountid": ACCT_B}, 531),
        ({"account": "bob"}, 531),
        ({"account": ACCT_B}, 531),
        ({"domainid": DOMAIN_B}, 531),
        ({"projectid": PROJECT_B}, 531),
        ({"isrecursive": "true"}, 531),
        ({"type": "4", "usageid": VM2}, 200),  # another account's resource: nothing, not an error
    ],
)
def test_a_scoped_caller_sees_its_accounts_only(
    client: FlaskClient, extra: dict[str, str], status: int
) -> None:
    code, body = call(client, accounts=ACCT_A, **DAY, **extra)
    assert code == status, body
    if status == 531:
        error = body["listusagerecordsresponse"]
        assert (error["errorcode"], error["cserrorcode"]) == (531, 4365)
        return
    assert {r["accountid"] for r in records(body)} <= {ACCT_A}
    assert all(r["usageid"] != VM2 for r in records(body))


def test_a_caller_scoped_to_no_account_sees_nothing(client: FlaskClient) -> None:
    assert call(client, accounts="", **DAY) == (200, {"listusagerecordsresponse": {}})
    code, _ = call(client, accounts="", **DAY, accountid=ACCT_A)
    assert code == 531


def test_unattributed_bytes_are_nobodys_usage(store: Store) -> None:
    with store.write() as conn:
        store.add_bytes(conn, {UsageKey("", 4, IP1, "", "public", T0, T0 + HOUR): 10}, {}, 0, NOW)
    _, body = call(scoped_app(store).test_client(), **DAY, type="4")
    assert keys(body) == expected_keys(usage_type=4)


def test_a_refused_body_is_answered_in_cloudstacks_default_xml(client: FlaskClient) -> None:
    resp = client.post("/client/api?command=listUsageRecords", data=b"x" * (MAX_BODY_BYTES + 1))
    assert (resp.status_code, resp.content_type) == (413, "text/xml; charset=UTF-8")
    assert ET.fromstring(resp.data).findtext("errorcode") == "413"


def test_names_from_cloudstacks_api_give_names_domain_paths_and_subdomains(store: Store) -> None:
    snapshot = Snapshot(
        taken_ms=NOW,
        accounts={ACCT_A: Account(ACCT_A, "alice", DOMAIN_A), ACCT_B: Account(ACCT_B, "bob-api", DOMAIN_B)},
        domains={
            DOMAIN_A: Domain(DOMAIN_A, "ROOT", "ROOT"),
            DOMAIN_B: Domain(DOMAIN_B, "customers", "ROOT/customers"),
        },
    )
    with store.write() as conn:  # as the reconciler keeps what CloudStack's API said
        save_names(conn, snapshot, NOW)
    client = scoped_app(store).test_client()
    _, body = call(client, **DAY, domainid=DOMAIN_A, isrecursive="true")
    assert keys(body) == expected_keys()
    _, body = call(client, **DAY, domainid=DOMAIN_A)
    assert keys(body) == expected_keys(account=ACCT_A)
    _, body = call(client, **DAY, domainid=DOMAIN_B, isrecursive="true", type="4")
    (rec,) = records(body)
    assert (rec["account"], rec["domain"], rec["domainpath"]) == ("bob-api", "customers", "ROOT/customers")
    _, body = call(client, **DAY, account="bob-api")
    assert keys(body) == expected_keys(account=ACCT_B)
    code, _ = call(client, accounts=ACCT_B, **DAY, domainid=DOMAIN_A, isrecursive="true")
    assert code == 531  # the root domain holds another account too
