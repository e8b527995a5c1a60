"""listUsageRecords' `account` name as CloudStack's database compares it: without case and accents.

CloudStack's AccountDao.listAccounts matches `account_name = ?` under the column's collation:
utf8(mb3)_general_ci before 4.20, utf8mb4's default since (utf8mb4_0900_ai_ci on MySQL 8,
utf8mb4_general_ci on MariaDB). Every one of them finds `José` for `jose`; they disagree on ß,
ligatures and trailing spaces, which kvmeter then leaves unfolded (it finds less, never more).
Never wider than the caller's own accounts.
"""

from __future__ import annotations

from flask.testing import FlaskClient

from kvmeter.collector.cs_snapshot import Account, Domain, Snapshot
from kvmeter.collector.model import UsageKey
from kvmeter.collector.store import Store
from kvmeter.collector.store.reconciliation import save_names
from tests.collector_support import ACCT_A, ACCT_B, HOUR, T0
from tests.integration.test_cloudstack_api import DAY, call, keys, scoped_app

ROOT = "d0000000-0000-4000-8000-00000000root"
NORTH, SOUTH = "d0000000-0000-4000-8000-000000north", "d0000000-0000-4000-8000-000000south"
NOW = T0 + 5 * HOUR
RECORDS = {ACCT_A: "vm-a0000000-aaaa", ACCT_B: "vm-b0000000-bbbb"}
TWO_JOSES = {ACCT_A: Account(ACCT_A, "José", NORTH), ACCT_B: Account(ACCT_B, "jose", SOUTH)}  # two tenants


def fill(store: Store, accounts: dict[str, Account]) -> FlaskClient:
    """One record for each of ACCT_A and ACCT_B, and the names CloudStack's API listed."""
    with store.write() as conn:
        rows = {UsageKey(a, 4, vm, "", "public", T0, T0 + HOUR): 5 for a, vm in RECORDS.items()}
        store.add_bytes(conn, rows, {}, 0, NOW)
        domains = {
            ROOT: Domain(ROOT, "ROOT", "ROOT"),
            NORTH: Domain(NORTH, "north", "ROOT/north"),
            SOUTH: Domain(SOUTH, "south", "ROOT/south"),
        }
        save_names(conn, Snapshot(taken_ms=NOW, accounts=accounts, domains=domains), NOW)
    return scoped_app(store).test_client()


def of(*accounts: str) -> set[tuple[str, int, str, str]]:
    return {(a, 4, RECORDS[a], "2024-05-14T09:00:00+0000") for a in accounts}


def test_an_account_name_is_found_without_its_accents(store: Store) -> None:
    """`account=Jose&domainid=<north>` finds the account CloudStack named `José` (and `JOSÉ`,
    `josé` in NFD form find it too), as CloudStack's accent-insensitive collations do, instead
    of kvmeter's 431 "Unable to find account"; another domain's `jose` stays out."""
    client = fill(store, TWO_JOSES)
    for name in ("Jose", "JOSÉ", "jose\u0301", "José"):
        code, body = call(client, **DAY, account=name, domainid=NORTH)
        assert (code, keys(body)) == (200, of(ACCT_A)), name
    code, body = call(client, **DAY, account="Jose")  # no domain: every account of that name
    assert (code, keys(body)) == (200, of(ACCT_A, ACCT_B))


def test_a_tenant_never_sees_another_tenants_account_whose_name_folds_alike(store: Store) -> None:
    """Two tenants, `José` in one domain and `jose` in another: the tenant of `jose` naming
    `JOSÉ` (no domain) gets its own records only, and naming `José` in the other tenant's
    domain gets 531 (never the other's records), as does naming the other's domain alone."""
    client = fill(store, TWO_JOSES)
    code, body = call(client, accounts=ACCT_B, **DAY, account="JOSÉ")
    assert (code, keys(body)) == (200, of(ACCT_B))
    for other in ({"account": "José", "domainid": NORTH}, {"account": "jose", "domainid": NORTH},
                  {"domainid": NORTH}):  # fmt: skip
        code, body = call(client, accounts=ACCT_B, **DAY, **other)
        assert (code, body["listusagerecordsresponse"]["cserrorcode"]) == (531, 4365), other
    code, body = call(client, accounts=ACCT_B, **DAY, account="José", domainid=SOUTH)
    assert (code, keys(body)) == (200, of(ACCT_B))


def test_a_sharp_s_is_not_folded_to_ss(store: Store) -> None:
    """`strasse` and `straße` are two accounts in one domain under utf8_general_ci (ß sorts as
    s there, not ss: CloudStack before 4.20, and on MariaDB): `account=strasse` answers the
    first only, never both accounts' records as one account's bill."""
    accounts = {ACCT_A: Account(ACCT_A, "strasse", NORTH), ACCT_B: Account(ACCT_B, "straße", NORTH)}
    client = fill(store, accounts)
    code, body = call(client, **DAY, account="STRASSE", domainid=NORTH)
    assert (code, keys(body)) == (200, of(ACCT_A))
    code, body = call(client, **DAY, account="STRAẞE", domainid=NORTH)
    assert (code, keys(body)) == (200, of(ACCT_B))
