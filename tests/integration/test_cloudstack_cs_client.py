"""The real `cs` client (PyPI) against the running API over HTTP: it signs its requests (signature
version 3 with an expiry) by GET and by POST with a form body, pages with page/pagesize through
`fetch_list`, filters, and reads CloudStack's errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cs import CloudStack, CloudStackApiException

from kvmeter.collector.api import serve
from kvmeter.collector.credentials import Credentials, CredentialSource, Grant
from kvmeter.collector.model import UsageKey
from kvmeter.collector.store import Store
from tests.api_support import running
from tests.collector_support import ACCT_A, ACCT_B, HOUR, T0

API_KEY, SECRET = "billing-api-key", "billing-secret-key"
TENANT_KEY, TENANT_SECRET = "tenant-b-api-key", "tenant-b-secret-key"  # scoped to account B
N_A, N_B = 1234, 56  # records of two accounts: A's need three pages of 500


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[str]:
    store = Store(f"sqlite:///{tmp_path}/usage.db")
    store.migrate()
    rows = {UsageKey(ACCT_A, 4, f"vm-a-{i:04d}", "", "public", T0 + i * 60_000, T0 + (i + 1) * 60_000): i + 1
            for i in range(N_A)}  # fmt: skip
    rows |= {UsageKey(ACCT_B, 5, f"vm-b-{i:04d}", "", "public", T0 + i * HOUR, T0 + (i + 1) * HOUR): 7
             for i in range(N_B)}  # fmt: skip
    with store.write() as conn:
        store.add_bytes(conn, rows, {}, 0, T0)
    keys = {
        API_KEY: (SECRET, Grant("billing")),
        TENANT_KEY: (TENANT_SECRET, Grant("tenant b", accounts=frozenset({ACCT_B}))),
    }
    server = serve(store, "127.0.0.1", 0, credentials=CredentialSource(Credentials(keys=keys)))
    with running(server) as url:
        yield f"{url}/client/api"
    store.close()


def client(endpoint: str, method: str = "get", secret: str = SECRET, key: str = API_KEY) -> Any:
    return CloudStack(endpoint=endpoint, key=key, secret=secret, method=method)


RANGE = {"startdate": "2024-05-14", "enddate": "2024-05-20"}


@pytest.mark.parametrize("method", ["get", "post"])
def test_cs_pages_through_every_record_signed(endpoint: str, method: str) -> None:
    cs = client(endpoint, method)
    records = cs.listUsageRecords(**RANGE, accountid=ACCT_A, fetch_list=True)
    assert len(records) == N_A
    assert [r["rawusage"] for r in records] == [str(i + 1) for i in range(N_A)]
    page = cs.listUsageRecords(**RANGE, page=3, pagesize=500)
    assert page["count"] == N_A + N_B
    assert len(page["usagerecord"]) == N_A + N_B - 1000
    first = cs.listUsageRecords(**RANGE)  # no pagesize: CloudStack's default page of 500
    assert (first["count"], len(first["usagerecord"])) == (N_A + N_B, 500)


@pytest.mark.parametrize("method", ["get", "post"])
def test_cs_filters(endpoint: str, method: str) -> None:
    cs = client(endpoint, method)
    received = cs.listUsageRecords(**RANGE, type=5, fetch_list=True)
    assert {r["accountid"] for r in received} == {ACCT_B}
    assert len(received) == N_B
    one = cs.listUsageRecords(**RANGE, type=4, usageid="vm-a-0042")
    assert [(r["usageid"], r["rawusage"], r["usage"]) for r in one["usagerecord"]] == [
        ("vm-a-0042", "43", "43 bytes sent")
    ]
    day = cs.listUsageRecords(
        startdate="2024-05-14 09:00:00", enddate="2024-05-14 09:59:59", accountid=ACCT_B
    )
    assert [r["startdate"] for r in day["usagerecord"]] == ["2024-05-14T09:00:00+0000"]
    types = cs.listUsageTypes()
    assert [t["id"] for t in types["usagetype"]] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("method", ["get", "post"])
def test_cs_reads_cloudstacks_errors(endpoint: str, method: str) -> None:
    cs = client(endpoint, method)
    with pytest.raises(CloudStackApiException) as refused:
        cs.listUsageRecords(**RANGE, page=1, pagesize=501)
    assert refused.value.error["errorcode"] == 431
    assert "max allowed page size value: 500" in refused.value.error["errortext"]
    with pytest.raises(CloudStackApiException) as unsigned:
        client(endpoint, method, secret="wrong").listUsageRecords(**RANGE)
    assert unsigned.value.error["errorcode"] == 401


@pytest.mark.parametrize("method", ["get", "post"])
def test_a_tenants_key_reads_its_own_account_only(endpoint: str, method: str) -> None:
    tenant = client(endpoint, method, TENANT_SECRET, TENANT_KEY)
    records = tenant.listUsageRecords(**RANGE, fetch_list=True)
    assert {r["accountid"] for r in records} == {ACCT_B}
    assert len(records) == N_B
    assert tenant.listUsageRecords(**RANGE, type=4) == {}  # account A's type: nothing, count 0
    for other in ({"accountid": ACCT_A}, {"account": ACCT_A}):
        with pytest.raises(CloudStackApiException) as denied:
            tenant.listUsageRecords(**RANGE, **other)
        assert (denied.value.error["errorcode"], denied.value.error["cserrorcode"]) == (531, 4365)
