"""CloudStack's /client/api (listUsageRecords) at its edges, as CloudStack's own source answers: a
recursive domain query beside a removed domain whose path was taken again, the usage server's
oldformat texts, a domain credential naming its subdomain that has no accounts yet."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from kvmeter.collector.cs_snapshot import Account, Domain, Snapshot
from kvmeter.collector.model import UsageKey
from kvmeter.collector.store import Store
from kvmeter.collector.store.reconciliation import save_names
from tests.api_support import filled_store, scoped_app
from tests.collector_support import HOUR, IP1, T0, VM1

ROOT, ACME_GONE, ACME_NOW = "d-root", "d-acme-removed", "d-acme-current"
GONE, CURRENT = "a-gone-customer", "a-current-customer"
DAY = dt.datetime.fromtimestamp(T0 / 1000, dt.UTC).strftime("%Y-%m-%d")


def _accounts(client: Any, **params: str) -> list[str]:
    query = {"command": "listUsageRecords", "startdate": DAY, "enddate": DAY, "response": "json", **params}
    resp = client.get("/client/api", query_string=query)
    assert resp.status_code == 200, resp.data
    return sorted(r["accountid"] for r in _records(resp.data))


def _accounts_of(data: bytes) -> list[str]:
    return sorted(r["accountid"] for r in _records(data))


def _records(data: bytes) -> list[dict[str, Any]]:
    return list(json.loads(data)["listusagerecordsresponse"].get("usagerecord", []))


def test_a_recursive_domain_query_leaves_out_a_removed_domain_whose_path_was_taken_again(
    tmp_path: Path,
) -> None:
    """isrecursive=true with domainid is the domain's tree as CloudStack's API lists it now
    (CloudStack searches the paths of domains not removed). Domain ROOT/acme of one customer is
    removed and another customer's new domain takes the path ROOT/acme again: the new domain's
    tree holds the new customer's records only, never the former customer's, and the removed
    domain is in no current tree (as api credentials scoped to a domain already see it)."""
    store = Store(f"sqlite:///{tmp_path}/usage.db")
    store.migrate()
    with store.write() as conn:
        for account in (GONE, CURRENT):
            key = UsageKey(account, 5, f"vm-of-{account}", "", "guest", T0, T0 + HOUR)
            store.add_bytes(conn, {key: 1000}, {}, 0, T0 + 2 * HOUR)
        root = Domain(ROOT, "ROOT", "ROOT")
        gone, now = Domain(ACME_GONE, "acme", "ROOT/acme"), Domain(ACME_NOW, "acme", "ROOT/acme")
        before = Snapshot(
            1, accounts={GONE: Account(GONE, "acme", ACME_GONE)}, domains={ROOT: root, ACME_GONE: gone}
        )
        after = Snapshot(
            2, accounts={CURRENT: Account(CURRENT, "acme", ACME_NOW)}, domains={ROOT: root, ACME_NOW: now}
        )
        save_names(conn, before, T0)  # the reconciler's pass before the removal...
        save_names(conn, after, T0 + HOUR)  # ...and after it, with the path taken again
    client = scoped_app(store).test_client()
    assert _accounts(client, domainid=ACME_NOW, isrecursive="true") == [CURRENT]
    assert _accounts(client, domainid=ROOT, isrecursive="true") == [CURRENT]
    assert _accounts(client, domainid=ACME_NOW) == [CURRENT]
    assert _accounts(client, domainid=ACME_GONE) == [GONE]  # its own records stay its own
    store.close()


def test_oldformat_descriptions_are_the_usage_servers_own_text(tmp_path: Path) -> None:
    """oldformat=true gives the description the usage server wrote (README: "the usage server's
    own description text (with uuids: kvmeter has no database ids)"), as apache/cloudstack's
    parsers write it: VMInstanceUsageParser "<vm> running time (ServiceOffering: <id>)
    (Template: <id>)" and "<vm> allocated (ServiceOffering: <id>) (Template: <id>)",
    IPAddressUsageParser "IPAddress: <address>", NetworkUsageParser "network bytes sent for
    Host: <device id>" / "network bytes received for Host: <device id>"."""
    store, _ = filled_store(tmp_path)
    client = scoped_app(store).test_client()
    query = {"command": "listUsageRecords", "startdate": DAY, "enddate": DAY, "response": "json"}
    resp = client.get("/client/api", query_string={**query, "oldformat": "true", "pagesize": "-1"})
    described = {(r["usagetype"], r["usageid"]): r["description"] for r in _records(resp.data)}
    assert described[(1, VM1)] == f"{VM1} running time (ServiceOffering: unknown) (Template: unknown)"
    assert described[(2, VM1)] == f"{VM1} allocated (ServiceOffering: unknown) (Template: unknown)"
    assert described[(3, IP1)] == f"IPAddress: {IP1}"
    bytes_records = {key: d for key, d in described.items() if key[0] in (4, 5)}
    assert bytes_records
    for (usage_type, device), description in bytes_records.items():
        verb = "sent" if usage_type == 4 else "received"
        assert description == f"network bytes {verb} for Host: {device}"
    resp = client.get("/client/api", query_string={**query, "pagesize": "-1"})  # the default: kvmeter's own
    assert all(not r["description"].startswith(("network bytes", "IPAddress: ")) for r in _records(resp.data))
    store.close()


def test_a_domain_credential_may_name_its_subdomain_that_has_no_accounts_yet(tmp_path: Path) -> None:
    """A credential scoped to a CloudStack domain (a domain admin's key) may name any domain of
    its tree: CloudStack checks the caller's access to the domain (a child of its own passes)
    and answers, here with no records. A new customer's subdomain with no account yet is
    answered empty, not refused with 531 as if it were another tenant's (a billing tool that
    walks listDomains would stop there). A domain outside the tree stays 531."""
    store = Store(f"sqlite:///{tmp_path}/usage.db")
    store.migrate()
    reseller, sub, other = "d-reseller", "d-reseller-new-customer", "d-other"
    with store.write() as conn:
        key = UsageKey(CURRENT, 5, "vm-1", "", "guest", T0, T0 + HOUR)
        store.add_bytes(conn, {key: 1000}, {}, 0, T0 + 2 * HOUR)
        domains = {
            ROOT: Domain(ROOT, "ROOT", "ROOT"),
            reseller: Domain(reseller, "reseller", "ROOT/reseller"),
            sub: Domain(sub, "new-customer", "ROOT/reseller/new-customer"),
            other: Domain(other, "other", "ROOT/other"),
        }
        save_names(
            conn, Snapshot(1, accounts={CURRENT: Account(CURRENT, "r", reseller)}, domains=domains), T0
        )
    client = scoped_app(store).test_client()
    query = {"command": "listUsageRecords", "startdate": DAY, "enddate": DAY, "response": "json"}
    admin = {"X-Test-Accounts": CURRENT, "X-Test-Domains": reseller}  # as its credential resolves
    for extra in ({"domainid": sub}, {"domainid": sub, "isrecursive": "true"}):
        resp = client.get("/client/api", query_string={**query, **extra}, headers=admin)
        assert (resp.status_code, json.loads(resp.data)) == (200, {"listusagerecordsresponse": {}}), extra
    resp = client.get(
        "/client/api", query_string={**query, "domainid": reseller, "isrecursive": "true"}, headers=admin
    )
    assert _accounts_of(resp.data) == [CURRENT]
    assert (
        client.get("/client/api", query_string={**query, "domainid": other}, headers=admin).status_code == 531
    )
    user = {"X-Test-Accounts": CURRENT}  # an account's key, not the domain's
    assert client.get("/client/api", query_string={**query, "domainid": sub}, headers=user).status_code == 531
    store.close()
