"""/v1/credits and /v1/balances: operators add credits, every caller reads only its own
accounts' credits and balances, bad input is a clear 400 (never a 5xx), on both stores."""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient

from kvmeter.collector.api import authenticator, create_app
from kvmeter.collector.balance_watch import BalanceBook
from kvmeter.collector.balances import Thresholds
from kvmeter.collector.credentials import Credentials, CredentialSource, Grant, token_digest
from kvmeter.collector.store import Store
from tests.billing_support import ACCT_A, ACCT_B, GB, Cloud, tariff

OPERATOR, TENANT_A, TENANT_B = "op-token", "tenant-a-token", "tenant-b-token"


def client(store: Store, book: BalanceBook | None) -> FlaskClient:
    tokens = {
        token_digest(OPERATOR): Grant("ops"),
        token_digest(TENANT_A): Grant("tenant a", frozenset({ACCT_A})),
        token_digest(TENANT_B): Grant("tenant b", frozenset({ACCT_B})),
    }
    auth = authenticator(store, CredentialSource(Credentials(tokens=tokens)), loopback=False)
    return create_app(store, auth=auth, balances=book).test_client()


def call(api: FlaskClient, method: str, path: str, token: str, **kw: Any) -> tuple[int, Any]:
    response = api.open(path, method=method, headers={"Authorization": f"Bearer {token}"}, **kw)
    return response.status_code, response.get_json(silent=True)


@pytest.fixture
def api(store: Store) -> tuple[FlaskClient, Cloud]:
    return client(store, BalanceBook(store, tariff, Thresholds())), Cloud(store)


def test_operator_adds_tenants_read_only_their_own(api: tuple[FlaskClient, Cloud]) -> None:
    app, cloud = api
    status, body = call(
        app, "POST", "/v1/credits", OPERATOR, json={"account": ACCT_A, "amount": "25.00", "note": "top-up"}
    )
    assert status == 201, body
    assert (body["account"], body["amount"], body["currency"], body["created_by"]) == (
        ACCT_A,
        "25.00",
        "EUR",
        "ops",
    )
    assert call(app, "POST", "/v1/credits", OPERATOR, json={"account": ACCT_B, "amount": "3"})[0] == 201
    # A tenant may not add credits, to itself or anyone.
    for token in (TENANT_A, TENANT_B):
        status, body = call(app, "POST", "/v1/credits", token, json={"account": ACCT_A, "amount": "1000"})
        assert status == 403, body
    cloud.send(ACCT_A, 4 * GB)
    cloud.send(ACCT_B, 1 * GB)

    status, body = call(app, "GET", "/v1/credits", TENANT_A)
    assert status == 200
    assert [c["account"] for c in body["credits"]] == [ACCT_A]
    status, body = call(app, "GET", "/v1/balances", TENANT_A)
    assert status == 200
    [mine] = body["balances"]
    assert mine == {"account": ACCT_A, "currency": "EUR", "credits": "25.00", "costs": "4.00",
                    "balance": "21.00", "threshold": None, "below_threshold": False}  # fmt: skip
    # Another's balance or credits: refused, whichever way asked.
    for path in ("/v1/balances", "/v1/credits"):
        assert call(app, "GET", f"{path}?account={ACCT_B}", TENANT_A)[0] == 403
        status, body = call(app, "GET", path, TENANT_B)
        assert status == 200
        assert {row["account"] for row in body[path.rsplit("/", 1)[1]]} == {ACCT_B}
    status, body = call(app, "GET", "/v1/balances", OPERATOR)
    assert [(b["account"], b["balance"]) for b in body["balances"]] == [(ACCT_A, "21.00"), (ACCT_B, "2.00")]


@pytest.mark.parametrize(
    "body",
    [
        {"account": ACCT_A, "amount": 25.5},  # a float: money is text
        {"account": ACCT_A, "amount": "-5"},
        {"account": ACCT_A, "amount": "0"},
        {"account": ACCT_A, "amount": "NaN"},
        {"account": ACCT_A, "amount": "1e400"},
        {"account": ACCT_A, "amount": "0.0000000000001"},
        {"account": ACCT_A, "amount": "ten"},
        {"account": ACCT_A, "amount": "5", "currency": "USD"},  # the tariff's is EUR
        {"account": ACCT_A, "amount": "5", "owner": "x"},
        {"account": "", "amount": "5"},
        {"account": "a\x00b", "amount": "5"},
        {"amount": "5"},
        ["not", "an", "object"],
    ],
)
def test_bad_credits_are_refused_with_a_reason(api: tuple[FlaskClient, Cloud], body: Any) -> None:
    app, _ = api
    status, answer = call(app, "POST", "/v1/credits", OPERATOR, json=body)
    assert status == 400, answer
    assert answer["error"]
    assert call(app, "GET", "/v1/credits", OPERATOR)[1]["count"] == 0


def test_without_a_tariff_credits_name_their_currency_and_balances_are_off(store: Store) -> None:
    app = client(store, None)
    assert call(app, "POST", "/v1/credits", OPERATOR, json={"account": ACCT_A, "amount": "5"})[0] == 400
    assert call(app, "POST", "/v1/credits", OPERATOR, data="{", content_type="application/json")[0] == 400
    status, body = call(
        app, "POST", "/v1/credits", OPERATOR, json={"account": ACCT_A, "amount": "5", "currency": "usd"}
    )
    assert status == 201, body
    assert body["currency"] == "USD"
    status, body = call(
        app, "POST", "/v1/credits", OPERATOR, json={"account": ACCT_A, "amount": "5", "currency": "EUR"}
    )
    assert status == 409, body  # one currency per account
    status, body = call(app, "GET", "/v1/balances", OPERATOR)
    assert status == 404
    assert "tariff" in body["error"]
