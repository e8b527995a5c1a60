"""What the API refuses, and how: a 4xx, never a 5xx, and nothing learned of other tenants.
Inputs at the edges of what each endpoint takes (a month whose end is past 9999, a signature
header outside ASCII, a JSON body nested too deep, CloudStack's string parameters too long or
holding control characters) and the scope checks of listUsageRecords' domainid."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask.testing import FlaskClient

from kvmeter.collector.api import create_app
from kvmeter.collector.billing import tariff_file
from kvmeter.collector.billing.tariff_file import TariffSource
from kvmeter.collector.cs_snapshot import Account, Domain, Snapshot
from kvmeter.collector.input_webhook import PATH as WEBHOOK_PATH
from kvmeter.collector.input_webhook import WebhookInput
from kvmeter.collector.store import Store
from kvmeter.collector.store.reconciliation import save_names
from tests.api_support import NOW, TARIFF, filled_store, scoped_app
from tests.collector_support import ACCT_A, ACCT_B

OPERATOR_TOKEN = "operator-token-0123456789"
DOMAIN_A = "d0000000-0000-4000-8000-00000000dom-a"
DOMAIN_B = "d0000000-0000-4000-8000-00000000dom-b"
NO_SUCH_DOMAIN = "d0000000-0000-4000-8000-0000000nodom"
DAY = {"command": "listUsageRecords", "startdate": "2024-05-14", "enddate": "2024-05-14", "response": "json"}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s, _ = filled_store(tmp_path)
    yield s
    s.close()


def reconciled(store: Store) -> None:
    """The reconciler has listed CloudStack's accounts and domains (with their paths)."""
    snapshot = Snapshot(
        taken_ms=NOW,
        accounts={ACCT_A: Account(ACCT_A, "alice", DOMAIN_A), ACCT_B: Account(ACCT_B, "bob", DOMAIN_B)},
        domains={
            DOMAIN_A: Domain(DOMAIN_A, "a", "ROOT/a"),
            DOMAIN_B: Domain(DOMAIN_B, "b", "ROOT/b"),
        },
    )
    with store.write() as conn:
        save_names(conn, snapshot, NOW)


def cs_call(client: FlaskClient, headers: dict[str, str], **params: str) -> tuple[int, dict[str, Any]]:
    resp = client.get("/client/api", query_string={**DAY, **params}, headers=headers)
    return resp.status_code, json.loads(resp.data)


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Test-Accounts": ACCT_A},  # a credential scoped to account A
        {"X-Test-Accounts": ACCT_A, "X-Test-Domains": DOMAIN_A},  # scoped to domain A
    ],
    ids=["account-scoped", "domain-scoped"],
)
def test_scoped_caller_cannot_tell_whether_another_domain_exists(
    store: Store, headers: dict[str, str]
) -> None:
    """A scoped credential naming a domain outside its own gets 531 whether the domain exists or
    not: with isrecursive=true too, where a domain kvmeter has no path for would otherwise be
    431 ("not known for this domain"), telling other tenants' domains from no domain."""
    reconciled(store)
    client = scoped_app(store).test_client()
    existing, _ = cs_call(client, headers, domainid=DOMAIN_B, isrecursive="true")
    missing, body = cs_call(client, headers, domainid=NO_SUCH_DOMAIN, isrecursive="true")
    assert existing == 531
    assert missing == 531, body


def test_a_string_parameter_longer_than_cloudstacks_limit_is_a_431(store: Store) -> None:
    """keyword goes into a LIKE pattern, which SQLite refuses beyond 50,000 bytes (a 530 if it got
    there); CloudStack refuses a string parameter over 255 characters, and so does kvmeter, by
    GET (request heads may be 64 KiB) and by a POST form alike."""
    client = scoped_app(store).test_client()
    resp = client.get("/client/api", query_string={**DAY, "keyword": "a" * 50_001})
    assert resp.status_code == 431, resp.data[:200]
    assert b"max allowed length 255 for param: keyword" in resp.data
    assert client.get("/client/api", query_string={**DAY, "keyword": "a" * 255}).status_code == 200
    # and as a POST form (the form body limit is 64 KiB)
    resp = client.post("/client/api", data={**DAY, "keyword": "k" * 50_001})
    assert resp.status_code == 431, resp.data[:200]


def test_a_month_whose_end_is_past_9999_is_a_400(store: Store, tmp_path: Path) -> None:
    """9999-12 would end in the year 10000, which no time here can be: refused as a month (for
    operators and tenants), while 9999-11 is answered."""
    tariffs = TariffSource(tariff_file.from_dict(TARIFF), tmp_path / "tariff.toml")
    client = scoped_app(store, tariffs=tariffs).test_client()
    resp = client.get("/v1/costs", query_string={"month": "9999-12"})
    assert resp.status_code == 400, resp.data
    assert b"between 1970-01 and 9999-11" in resp.data
    resp = client.get("/v1/costs", query_string={"month": "9999-12"}, headers={"X-Test-Accounts": ACCT_A})
    assert resp.status_code == 400, resp.data
    assert client.get("/v1/costs", query_string={"month": "9999-11"}).status_code == 200


def test_webhook_signature_with_non_ascii_is_a_401_not_a_500(store: Store) -> None:
    """Before any credential: header bytes 0x80-0xFF arrive as latin-1 text, which
    hmac.compare_digest refuses among str (a TypeError): the signatures are compared as bytes."""
    app = create_app(store, token=OPERATOR_TOKEN, webhook=WebhookInput("webhook-secret"))
    resp = app.test_client().post(WEBHOOK_PATH, data=b"{}", headers={"X-CS-Signature": "\u00e9"})
    assert resp.status_code == 401, resp.data


def test_credits_deeply_nested_json_body_is_a_400_not_a_500(store: Store) -> None:
    """get_json(silent=True) takes ValueError only: a body of nested arrays well under the
    64 KiB limit makes json.loads raise RecursionError, which is a body that is not JSON too."""
    client = create_app(store, token=OPERATOR_TOKEN).test_client()
    resp = client.post(
        "/v1/credits",
        data="[" * 50_000,
        content_type="application/json",
        headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"},
    )
    assert resp.status_code == 400, resp.data


@pytest.mark.parametrize("param", ["keyword", "usageid", "account"])
def test_control_characters_in_a_string_parameter_never_reach_the_database(store: Store, param: str) -> None:
    """NUL above all, which PostgreSQL refuses in text (psycopg's DataError, a 530): 431, and no
    query is sent with it (the SQL parameters are watched on the SQLite store)."""
    sent: list[Any] = []

    @sa.event.listens_for(store.engine, "before_cursor_execute")
    def _capture(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        sent.append(parameters)

    client = scoped_app(store).test_client()
    extra = {param: "a\x00b"} | ({"type": "1"} if param == "usageid" else {})
    resp = client.get("/client/api", query_string={**DAY, **extra})
    reached = any(
        isinstance(v, str) and "\x00" in v for p in sent for v in (p.values() if isinstance(p, dict) else p)
    )
    assert resp.status_code == 431, resp.data[:200]
    assert not reached


@pytest.mark.parametrize("named", [{"account": "alice"}, {"accountid": ACCT_A}], ids=["account", "accountid"])
def test_tenant_may_name_its_own_account_with_its_own_domain(store: Store, named: dict[str, str]) -> None:
    """account=<own name>&domainid=<own domain>: CloudStack lets a user name its own domain
    (isChildDomain(caller's domain, domainid)), also where the domain holds other accounts; the
    answer holds the caller's account only, and another account of the domain stays 531."""
    snapshot = Snapshot(
        taken_ms=NOW,
        accounts={ACCT_A: Account(ACCT_A, "alice", DOMAIN_A), "acct-c": Account("acct-c", "carol", DOMAIN_A)},
        domains={DOMAIN_A: Domain(DOMAIN_A, "a", "ROOT/a")},
    )
    with store.write() as conn:
        save_names(conn, snapshot, NOW)
    client = scoped_app(store).test_client()
    code, body = cs_call(client, {"X-Test-Accounts": ACCT_A}, domainid=DOMAIN_A, **named)
    assert code == 200, body
    (inner,) = body.values()
    assert {r["accountid"] for r in inner["usagerecord"]} == {ACCT_A}
    # the other account of that domain stays refused
    code, _ = cs_call(client, {"X-Test-Accounts": ACCT_A}, domainid=DOMAIN_A, account="carol")
    assert code == 531
