"""listUsageRecords naming an account or domain that does not exist: CloudStack's 431 once
kvmeter knows which exist (the reconciler listed them), an empty answer before; on both stores.

The codes and texts are CloudStack's: ParamProcessWorker's for a uuid parameter that names
nothing (rethrown as a ServerApiException: cserrorcode 9999), UsageServiceImpl's
"Unable to find account <name> in domain <id>" (an InvalidParameterValueException: 4350).
"""

from __future__ import annotations

import json

import pytest
from flask.testing import FlaskClient

from kvmeter.collector.cs_snapshot import Account, Domain, Snapshot
from kvmeter.collector.model import UsageKey
from kvmeter.collector.store import Store
from kvmeter.collector.store.reconciliation import save_names
from tests.collector_support import ACCT_A, ACCT_B, HOUR, T0
from tests.integration.test_cloudstack_api import DAY, call, keys, scoped_app

ACCT_C = "a0000000-0000-4000-8000-0000000acct-c"  # has records, named by neither API nor <metadata>
DOMAIN_A, DOMAIN_B = "d-root", "d-customers"
NOW = T0 + 5 * HOUR
HINTS = {"vm-b": {"instanceUuid": "vm-b", "ownerAccountUuid": ACCT_B, "ownerAccountName": "bob",
                  "ownerDomainUuid": DOMAIN_B}}  # fmt: skip
RECORDS = {ACCT_A: "vm-a", ACCT_B: "vm-b", ACCT_C: "vm-c"}


def fill(store: Store, *, listed: bool) -> FlaskClient:
    with store.write() as conn:
        rows = {UsageKey(a, 4, vm, "", "public", T0, T0 + HOUR): 5 for a, vm in RECORDS.items()}
        store.add_bytes(conn, rows, {}, 0, NOW)
        store.save_owner_hints(conn, HINTS, NOW)
        if listed:  # CloudStack's API listed alice and the root domain to the reconciler
            snapshot = Snapshot(
                taken_ms=NOW,
                accounts={ACCT_A: Account(ACCT_A, "alice", DOMAIN_A)},
                domains={DOMAIN_A: Domain(DOMAIN_A, "ROOT", "ROOT")},
            )
            save_names(conn, snapshot, NOW)
    return scoped_app(store).test_client()


def only(account: str) -> set[tuple[str, int, str, str]]:
    return {(account, 4, RECORDS[account], "2024-05-14T09:00:00+0000")}


UNKNOWN: list[tuple[dict[str, str], int, str]] = [
    ({"accountid": "no-such-account"}, 9999, "Invalid parameter accountid value=no-such-account due to"),
    ({"domainid": "no-such-domain"}, 9999, "Invalid parameter domainid value=no-such-domain due to"),
    ({"account": "alice", "domainid": DOMAIN_B}, 4350, f"Unable to find account alice in domain {DOMAIN_B}"),
    ({"account": "carol", "domainid": DOMAIN_A}, 4350, f"Unable to find account carol in domain {DOMAIN_A}"),
    ({"account": "carol"}, 4350, "Unable to find account carol"),
]


@pytest.mark.parametrize(("extra", "cs_code", "text"), UNKNOWN, ids=[json.dumps(c[0]) for c in UNKNOWN])
def test_what_does_not_exist_is_cloudstacks_431_once_accounts_are_listed(
    store: Store, extra: dict[str, str], cs_code: int, text: str
) -> None:
    code, body = call(fill(store, listed=True), **DAY, **extra)
    error = body["listusagerecordsresponse"]
    assert (code, error["errorcode"], error["cserrorcode"]) == (431, 431, cs_code), body
    assert text in error["errortext"]


@pytest.mark.parametrize(("extra", "_cs_code", "_text"), UNKNOWN, ids=[json.dumps(c[0]) for c in UNKNOWN])
def test_before_accounts_are_listed_what_is_unknown_is_an_empty_answer(
    store: Store, extra: dict[str, str], _cs_code: int, _text: str
) -> None:
    assert call(fill(store, listed=False), **DAY, **extra) == (200, {"listusagerecordsresponse": {}})


KNOWN: list[tuple[dict[str, str], str | None]] = [
    ({"accountid": ACCT_A}, ACCT_A),  # listed by CloudStack's API
    ({"account": "alice", "domainid": DOMAIN_A}, ACCT_A),
    ({"accountid": ACCT_B}, ACCT_B),  # named by <metadata>
    ({"account": "bob", "domainid": DOMAIN_B}, ACCT_B),  # in <metadata>'s domain
    ({"accountid": ACCT_C}, ACCT_C),  # seen in its records alone
    ({"account": ACCT_C}, ACCT_C),  # the bus's uuid as the name
    ({"projectid": "p-none"}, None),  # projects are never all known: empty, not an error
]


@pytest.mark.parametrize(("extra", "account"), KNOWN, ids=[json.dumps(c[0]) for c in KNOWN])
def test_accounts_known_by_any_source_are_answered(
    store: Store, extra: dict[str, str], account: str | None
) -> None:
    code, body = call(fill(store, listed=True), **DAY, **extra)
    assert code == 200, body
    assert keys(body) == (only(account) if account else set())


def test_a_scoped_caller_learns_nothing_of_which_accounts_exist(store: Store) -> None:
    client = fill(store, listed=True)
    for other in ({"accountid": "no-such-account"}, {"accountid": ACCT_C}, {"domainid": "no-such-domain"}):
        code, body = call(client, accounts=ACCT_A, **DAY, **other)
        assert (code, body["listusagerecordsresponse"]["cserrorcode"]) == (531, 4365), other
