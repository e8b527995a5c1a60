"""listUsageRecords' account, uuid and scope parameters as CloudStack's own source answers them.

UsageServiceImpl.getUsageRecords finds `account` with AccountDao.listAccounts (account_name = ?)
and every uuid parameter with findByUuid (uuid = ?), both under MySQL's case-insensitive
collations (utf8 / utf8mb4 defaults); with `isrecursive=true` it drops the account filter unless
`accountid` or `projectid` was given, and filters by the domain's tree. Never wider than the
caller's own accounts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cs import CloudStack, CloudStackApiException
from flask.testing import FlaskClient

from kvmeter.collector.api import serve
from kvmeter.collector.credentials import Credentials, CredentialSource, Grant
from kvmeter.collector.cs_snapshot import Account, Domain, Snapshot
from kvmeter.collector.model import UsageKey
from kvmeter.collector.store import Store
from kvmeter.collector.store.reconciliation import save_names
from tests.api_support import running
from tests.collector_support import ACCT_A, ACCT_B, HOUR, T0
from tests.integration.test_cloudstack_api import DAY, call, keys, scoped_app

ROOT, SUB = "d0000000-0000-4000-8000-00000000root", "d0000000-0000-4000-8000-000000000sub"
NOW = T0 + 5 * HOUR
RECORDS = {ACCT_A: "vm-a0000000-aaaa", ACCT_B: "vm-b0000000-bbbb"}


def fill(store: Store) -> FlaskClient:
    """alice (ACCT_A) in ROOT, bob (ACCT_B) in ROOT/customers, as CloudStack's API listed them."""
    with store.write() as conn:
        rows = {UsageKey(a, 4, vm, "", "public", T0, T0 + HOUR): 5 for a, vm in RECORDS.items()}
        store.add_bytes(conn, rows, {}, 0, NOW)
        snapshot = Snapshot(
            taken_ms=NOW,
            accounts={ACCT_A: Account(ACCT_A, "alice", ROOT), ACCT_B: Account(ACCT_B, "bob", SUB)},
            domains={ROOT: Domain(ROOT, "ROOT", "ROOT"), SUB: Domain(SUB, "customers", "ROOT/customers")},
        )
        save_names(conn, snapshot, NOW)
    return scoped_app(store).test_client()


def of(*accounts: str) -> set[tuple[str, int, str, str]]:
    return {(a, 4, RECORDS[a], "2024-05-14T09:00:00+0000") for a in accounts}


def test_account_names_and_uuids_are_found_in_any_case(store: Store) -> None:
    """`account=ALICE&domainid=<root>` finds alice, and accountid, domainid and usageid in upper
    case find what they name in lower case, as CloudStack's lookups do (case-insensitive
    collations); a tenant naming another account in another case still gets 531."""
    client = fill(store)
    for extra in (
        {"account": "ALICE", "domainid": ROOT},
        {"account": "Alice", "domainid": ROOT.upper()},
        {"accountid": ACCT_A.upper()},
        {"type": "4", "usageid": RECORDS[ACCT_A].upper()},
        {"domainid": ROOT.upper()},
    ):
        code, body = call(client, **DAY, **extra)
        assert (code, keys(body)) == (200, of(ACCT_A)), extra
    code, body = call(client, accounts=ACCT_A, **DAY, account="ALICE", domainid=ROOT)
    assert (code, keys(body)) == (200, of(ACCT_A))
    for other in ({"account": "BOB", "domainid": SUB}, {"accountid": ACCT_B.upper()}):
        code, body = call(client, accounts=ACCT_A, **DAY, **other)
        assert (code, body["listusagerecordsresponse"]["cserrorcode"]) == (531, 4365), other


def test_an_account_name_with_a_recursive_domain_lists_the_domains_tree(store: Store) -> None:
    """`account=alice&domainid=<root>&isrecursive=true` is ROOT's whole tree, alice's and bob's
    records (CloudStack drops the account filter then); with accountid it is that account's
    records in the tree (bob in a subdomain of ROOT); a name not in the domain stays CloudStack's
    431; a caller scoped to bob's subdomain naming alice in ROOT gets 531, never alice's records."""
    client = fill(store)
    code, body = call(client, **DAY, account="alice", domainid=ROOT, isrecursive="true")
    assert (code, keys(body)) == (200, of(ACCT_A, ACCT_B))
    code, body = call(client, **DAY, accountid=ACCT_B, domainid=ROOT, isrecursive="true")
    assert (code, keys(body)) == (200, of(ACCT_B))
    code, _ = call(client, **DAY, account="carol", domainid=ROOT, isrecursive="true")
    assert code == 431
    headers = {"X-Test-Accounts": ACCT_B, "X-Test-Domains": SUB}
    resp = client.get("/client/api", query_string={**DAY, "account": "alice", "domainid": ROOT,
                                                   "isrecursive": "true"}, headers=headers)  # fmt: skip
    assert resp.status_code == 531, resp.data
    resp = client.get("/client/api", query_string={**DAY, "account": "bob", "domainid": SUB,
                                                   "isrecursive": "true"}, headers=headers)  # fmt: skip
    assert resp.status_code == 200, resp.data


def test_the_cs_client_finds_an_account_and_a_resource_by_uuid_in_upper_case(tmp_path: Path) -> None:
    """The real `cs` client, signed, over HTTP: accountid and usageid in upper case answer the
    records of the account and VM kvmeter keeps in lower case (an account known by its records
    alone), as CloudStack finds uuids in any case; a tenant key asking so for another account
    still gets 531."""
    store = Store(f"sqlite:///{tmp_path}/usage.db")
    store.migrate()
    with store.write() as conn:
        rows = {UsageKey(a, 4, vm, "", "public", T0, T0 + HOUR): 5 for a, vm in RECORDS.items()}
        store.add_bytes(conn, rows, {}, 0, NOW)
    keys_ = {
        "op-key": ("op-secret", Grant("billing")),
        "b-key": ("b-secret", Grant("b", accounts=frozenset({ACCT_B}))),
    }
    server = serve(store, "127.0.0.1", 0, credentials=CredentialSource(Credentials(keys=keys_)))
    with running(server) as url:
        cs = CloudStack(endpoint=f"{url}/client/api", key="op-key", secret="op-secret")
        got = cs.listUsageRecords(startdate="2024-05-14", enddate="2024-05-14", accountid=ACCT_A.upper(),
                                  type=4, usageid=RECORDS[ACCT_A].upper(), fetch_list=True)  # fmt: skip
        assert [(r["accountid"], r["usageid"]) for r in got] == [(ACCT_A, RECORDS[ACCT_A])]
        tenant = CloudStack(endpoint=f"{url}/client/api", key="b-key", secret="b-secret")
        with pytest.raises(CloudStackApiException) as refused:
            tenant.listUsageRecords(startdate="2024-05-14", enddate="2024-05-14", accountid=ACCT_A.upper())
        assert refused.value.error["errorcode"] == 531
    store.close()
