"""An account name taken again after its account was removed (CloudStack keeps names unique among
live accounts only): listUsageRecords' `account` (with `domainid`, and kvmeter's `account` alone)
is the namesake CloudStack made last, as UsageServiceImpl.getAccountIdFromDomainPlusName takes it
(AccountDao.listAccounts: removed accounts included, newest id first), never both. kvmeter tells
which one that is from when CloudStack last told of each: the reconciler's account listings, or
the VMs' <metadata> (owner hints). On both stores, and through the real `cs` client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cs import CloudStack

from kvmeter.collector.api import serve
from kvmeter.collector.credentials import Credentials, CredentialSource, Grant
from kvmeter.collector.cs_snapshot import Account, Domain, Snapshot
from kvmeter.collector.model import UsageKey
from kvmeter.collector.store import Store
from kvmeter.collector.store.reconciliation import save_names
from tests.api_support import running, scoped_app
from tests.collector_support import HOUR, T0
from tests.integration.test_cloudstack_api import DAY, call

OLD = "0ld00000-0000-4000-8000-00000000carol"  # carol, removed
NEW = "new00000-0000-4000-8000-00000000carol"  # carol again, made after OLD's removal
OTHER = "0th00000-0000-4000-8000-00000000carol"  # a carol of another domain
DOMAIN, ELSEWHERE = "d0000000-0000-4000-8000-000000customers", "d0000000-0000-4000-8000-0000000000else"
VMS = {OLD: "vm-old", NEW: "vm-new", OTHER: "vm-other"}
T1, T2, T3 = T0 + 5 * HOUR, T0 + 30 * 24 * HOUR, T0 + 40 * 24 * HOUR  # OLD last seen; NEW seen


def with_records(store: Store) -> Store:
    store.migrate()
    rows = {UsageKey(a, 4, vm, "", "public", T0, T0 + HOUR): 5 for a, vm in VMS.items()}
    with store.write() as conn:
        store.add_bytes(conn, rows, {}, 0, T1)
    return store


def listed(store: Store, now_ms: int, *accounts: str) -> None:
    """A reconciler pass: CloudStack's listAccounts gives the live accounts only."""
    snapshot = Snapshot(
        taken_ms=now_ms,
        accounts={a: Account(a, "carol", ELSEWHERE if a == OTHER else DOMAIN) for a in accounts},
        domains={
            DOMAIN: Domain(DOMAIN, "customers", "ROOT/customers"),
            ELSEWHERE: Domain(ELSEWHERE, "else", "ROOT/else"),
        },
    )
    with store.write() as conn:
        save_names(conn, snapshot, now_ms)


def hinted(store: Store, now_ms: int, account: str) -> None:
    """The agents' inventory tells the VM's <metadata> owner (learned at now_ms)."""
    domain = ELSEWHERE if account == OTHER else DOMAIN
    hint = {"instanceUuid": VMS[account], "ownerAccountUuid": account, "ownerAccountName": "carol",
            "ownerDomainUuid": domain}  # fmt: skip
    with store.write() as conn:
        store.save_owner_hints(conn, {VMS[account]: hint}, now_ms)


def accounts_of(body: dict[str, Any]) -> set[str]:
    (inner,) = body.values()
    return {r["accountid"] for r in inner.get("usagerecord", [])}


CAROL = {**DAY, "account": "carol", "domainid": DOMAIN}


def test_a_reused_name_is_the_account_made_last_from_the_reconcilers_listings(store: Store) -> None:
    """With the reconciler: while only the removed carol holds the name, `account=carol` with
    `domainid` answers hers (CloudStack finds removed accounts too); once a new carol is listed,
    only the new one's, for the operator and for a credential scoped to the domain (a domain
    admin): the new customer is never billed, nor shown, the previous one's usage."""
    with_records(store)
    client = scoped_app(store).test_client()
    listed(store, T1, OLD, OTHER)
    listed(store, T1 + HOUR, OTHER)  # OLD removed
    assert accounts_of(call(client, **CAROL)[1]) == {OLD}
    listed(store, T2, NEW, OTHER)  # carol made again
    client = scoped_app(store).test_client()  # names are read again every 10 s: a new app
    assert call(client, **CAROL) == call(client, **DAY, accountid=NEW)
    assert accounts_of(call(client, **CAROL)[1]) == {NEW}
    domain_admin = call(client, accounts=f"{OLD},{NEW}", **CAROL)[1]  # a domain credential resolved
    assert accounts_of(domain_admin) == {NEW}
    # kvmeter's own `account` without `domainid`: in each domain, the account that name finds there
    assert accounts_of(call(client, **DAY, account="carol")[1]) == {NEW, OTHER}
    assert accounts_of(call(client, **DAY, account="CAROL")[1]) == {NEW, OTHER}


def test_a_reused_name_is_the_account_made_last_from_the_vms_metadata(store: Store) -> None:
    """Without the reconciler, the owner hints alone: the carol whose <metadata> kvmeter learned
    last is the one `account=carol&domainid=` finds."""
    with_records(store)
    hinted(store, T1, OLD)
    hinted(store, T1, OTHER)
    hinted(store, T2, NEW)
    client = scoped_app(store).test_client()
    assert accounts_of(call(client, **CAROL)[1]) == {NEW}
    assert accounts_of(call(client, **DAY, account="carol")[1]) == {NEW, OTHER}


API_KEY, SECRET = "billing-api-key", "billing-secret-key"
ADMIN_KEY, ADMIN_SECRET = "domain-admin-key", "domain-admin-secret"  # scoped to DOMAIN


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[str]:
    store = with_records(Store(f"sqlite:///{tmp_path}/usage.db"))
    listed(store, T1, OLD, OTHER)
    hinted(store, T1, OLD)
    listed(store, T3, NEW, OTHER)
    keys = {
        API_KEY: (SECRET, Grant("billing")),
        ADMIN_KEY: (ADMIN_SECRET, Grant("customers' admin", domains=frozenset({DOMAIN}))),
    }
    server = serve(store, "127.0.0.1", 0, credentials=CredentialSource(Credentials(keys=keys)))
    with running(server) as url:
        yield f"{url}/client/api"
    store.close()


@pytest.mark.parametrize(("key", "secret"), [(API_KEY, SECRET), (ADMIN_KEY, ADMIN_SECRET)])
def test_cs_client_lists_the_new_namesakes_records_only(endpoint: str, key: str, secret: str) -> None:
    """The real `cs` client, signed, as the operator and as the domain's admin: `account` with
    `domainid` lists the live carol's records, not the removed carol's."""
    cs = CloudStack(endpoint=endpoint, key=key, secret=secret)
    found = cs.listUsageRecords(startdate="2024-05-14", enddate="2024-05-14", account="carol",
                                domainid=DOMAIN, fetch_list=True)  # fmt: skip
    assert {r["accountid"] for r in found} == {NEW}
