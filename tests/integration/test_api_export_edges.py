"""Edges of the HTTP API and the CLI's exports: a text cell a spreadsheet would run as a formula
or that would end its row early, CloudStack's own 401 on /client/api, and /v1 cursors handed from
one credential to another."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cs import CloudStack, CloudStackApiException
from flask.testing import FlaskClient

from kvmeter.collector import report
from kvmeter.collector.api import authenticator, create_app, serve
from kvmeter.collector.api_auth import cloudstack_signature
from kvmeter.collector.billing import tariff_file
from kvmeter.collector.billing.tariff_file import TariffSource
from kvmeter.collector.credentials import Credentials, CredentialSource, Grant, token_digest
from kvmeter.collector.cs_snapshot import Account, Domain, Snapshot
from kvmeter.collector.model import UsageKey
from kvmeter.collector.store import Store, UsageRow
from kvmeter.collector.store.reconciliation import save_names
from tests.api_support import TARIFF, running
from tests.collector_support import ACCT_A, ACCT_B, HOUR, T0

API_KEY, SECRET = "billing-api-key", "billing-secret-key"
UNAUTHORIZED = "unable to verify user credentials and/or request signature"
FORMULAS = ['=HYPERLINK("http://evil")', "+1+1", "-2+3", "@SUM(A1)", "\tx"]
DOMAIN_A = "d0000000-0000-4000-8000-00000000dom-a"
DOMAIN_B = "d0000000-0000-4000-8000-00000000dom-b"
TOKENS = {
    "token-of-tenant-a-0123": Grant("tenant a", accounts=frozenset({ACCT_A})),
    "token-of-tenant-b-0123": Grant("tenant b", accounts=frozenset({ACCT_B})),
    "token-of-domain-b-0123": Grant("domain b", domains=frozenset({DOMAIN_B})),
}


def _key(account: str, resource: str, hour: int) -> UsageKey:
    return UsageKey(account, 4, resource, "", "public", T0 + hour * HOUR, T0 + (hour + 1) * HOUR)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """Account A's VMs named (and one resource id) like formulas; account B's plain; A in
    domain A, B in domain B, as the reconciler lists them."""
    s = Store(f"sqlite:///{tmp_path}/usage.db")
    s.migrate()
    rows = {_key(ACCT_A, f"vm-a-{i}", i): 1000 + i for i in range(len(FORMULAS))}
    names = {_key(ACCT_A, f"vm-a-{i}", i): (name, "") for i, name in enumerate(FORMULAS)}
    rows[_key(ACCT_A, "=1+1", 0)] = 5  # a resource id in the costs CSV
    rows |= {_key(ACCT_B, f"vm-b-{i}", i): 7 for i in range(3)}
    with s.write() as conn:
        s.add_bytes(conn, rows, names, 0, T0)
        snapshot = Snapshot(
            taken_ms=T0,
            accounts={ACCT_A: Account(ACCT_A, "alice", DOMAIN_A), ACCT_B: Account(ACCT_B, "bob", DOMAIN_B)},
            domains={DOMAIN_A: Domain(DOMAIN_A, "a", "ROOT/a"), DOMAIN_B: Domain(DOMAIN_B, "b", "ROOT/b")},
        )
        save_names(conn, snapshot, T0)
    yield s
    s.close()


def _cells(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def _neutral(cell: str) -> bool:
    return not cell.startswith(("=", "+", "-", "@", "\t", "\r"))


def test_csv_exports_write_formula_like_text_cells_as_text(store: Store, tmp_path: Path) -> None:
    """Every CSV kvmeter writes (/v1/usage, /v1/adjustments, /v1/costs, and the CLI's --format
    csv, which renders with the same functions) writes a text cell starting with =, +, -, @, tab
    or CR with a leading ', so a spreadsheet never runs a tenant's VM name as a formula; numeric
    columns stay numbers, negative ones too."""
    tariffs = TariffSource(tariff_file.from_dict(TARIFF), tmp_path / "tariff.toml")
    client = create_app(store, tariffs=tariffs).test_client()
    window = {"start": "2024-05-14", "end": "2024-05-15", "format": "csv"}
    usage = _cells(client.get("/v1/usage", query_string=window).get_data(as_text=True))
    names = sorted(r["resource_name"] for r in usage if r["resource_name"])
    assert names == sorted("'" + f for f in FORMULAS), names
    costs = client.get("/v1/costs", query_string={"month": "2024-05", "format": "csv"})
    assert costs.status_code == 200, costs.data
    lines = _cells(costs.get_data(as_text=True))
    assert "'=1+1" in {r["resource"] for r in lines}
    assert all(_neutral(r["resource"]) and _neutral(r["detail"]) for r in lines)
    # A late byte to a final window: an adjustment whose reason a spreadsheet would run.
    with store.write() as conn:
        store.add_bytes(
            conn, {_key(ACCT_A, "vm-a-0", 0): 1}, {}, T0 + 24 * HOUR, T0 + HOUR, "=cmd|' /c calc'!A0"
        )
    adjustments = client.get("/v1/adjustments", query_string={"since": "2024-05-14", "format": "csv"})
    assert [r["reason"] for r in _cells(adjustments.get_data(as_text=True))] == ["'=cmd|' /c calc'!A0"]
    # The CLI's renderer, with a negative adjustment: numbers stay numbers.
    row = UsageRow(_key(ACCT_A, "vm-a-0", 0), -5, 0, -5, True, "-1+2", "@x", 0)
    (line,) = _cells(report.render([row], "csv"))
    assert (line["resource_name"], line["device_type"]) == ("'-1+2", "'@x")
    assert (line["quantity"], line["rawusage"], line["adjustment"]) == ("-5", "-5", "-5")


def test_csv_cell_with_a_carriage_return_cannot_forge_a_row(store: Store) -> None:
    """csv quotes only the characters of its line terminator ("\n"), so a VM name holding a CR
    went out bare and every CSV reader (and spreadsheet) ended the row there: a tenant could add
    rows of its choosing, another account's too, to the operator's export, and start a cell with
    a formula past the ' guard. A cell holding CR is quoted like one holding LF: one row per
    record, the name read back whole."""
    forged = f"web\r{ACCT_B},4,NETWORK_BYTES_SENT,=1+1"
    rows = [UsageRow(_key(ACCT_A, "vm-a-0", 0), 5, 5, 0, True, name, "", 0) for name in (forged, "\r=1+1")]
    text = report.render(rows, "csv")
    assert text.endswith("\n")
    assert "\r\n" not in text  # rows still end in LF alone
    assert [line["resource_name"] for line in _cells(text)] == [forged, "'\r=1+1"]
    client = create_app(store).test_client()
    window = {"start": "2024-05-14", "end": "2024-05-15", "format": "csv", "account": ACCT_A}
    usage = _cells(client.get("/v1/usage", query_string=window).get_data(as_text=True))
    assert {r["account"] for r in usage} == {ACCT_A}
    assert len(usage) == len(FORMULAS) + 1


def _signed(params: dict[str, str], secret: str) -> dict[str, str]:
    return {**params, "signature": cloudstack_signature(params.items(), secret)}


def test_client_api_refusal_is_cloudstacks_own(
    store: Store, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CloudStack's ApiServlet refuses every request it cannot authenticate alike: errorcode
    401, "unable to verify user credentials and/or request signature", and no cserrorcode
    (ApiServer.getSerializedApiError(int, String, ...) sets none). kvmeter answers the same for
    a bad signature, an unknown key, an expired request and no credential, in JSON and XML; the
    reason goes to its log, without the secret or the signature."""
    client = create_app(store, cloudstack_keys={API_KEY: SECRET}).test_client()
    base = {"command": "listUsageRecords", "startdate": "2024-05-14", "enddate": "2024-05-14"}
    past = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S+0000")
    requests = [
        _signed({**base, "apikey": API_KEY}, "wrong-secret"),
        _signed({**base, "apikey": "no-such-key"}, SECRET),
        _signed({**base, "apikey": API_KEY, "signatureversion": "3", "expires": past}, SECRET),
        base,
    ]
    expected = {"listusagerecordsresponse": {"uuidList": [], "errorcode": 401, "errortext": UNAUTHORIZED}}
    monkeypatch.setattr(logging.getLogger("kvmeter.collector.api.refusals"), "filters", [])  # every line
    with caplog.at_level(logging.INFO, logger="kvmeter.collector.api"):
        for params in requests:
            resp = client.get("/client/api", query_string={**params, "response": "json"})
            assert (resp.status_code, json.loads(resp.data)) == (401, expected), params
            xml = client.get("/client/api", query_string=params).get_data(as_text=True)
            assert f"<errorcode>401</errorcode><errortext>{UNAUTHORIZED}</errortext>" in xml
            assert "cserrorcode" not in xml
    logged = caplog.text
    assert "request expired" in logged
    assert "signature mismatch" in logged
    assert SECRET not in logged
    assert requests[0]["signature"] not in logged


def test_client_api_refusal_as_the_cs_client_reads_it(store: Store) -> None:
    """The real `cs` client, signing with a wrong secret, reads CloudStack's own refusal."""
    server = serve(store, "127.0.0.1", 0, cloudstack_keys={API_KEY: SECRET})
    with running(server) as url:
        cs = CloudStack(endpoint=f"{url}/client/api", key=API_KEY, secret="wrong", method="get")
        with pytest.raises(CloudStackApiException) as refused:
            cs.listUsageRecords(startdate="2024-05-14", enddate="2024-05-14")
    assert refused.value.error == {"uuidList": [], "errorcode": 401, "errortext": UNAUTHORIZED}


def _get(client: FlaskClient, token: str, path: str, **query: Any) -> tuple[int, Any]:
    resp = client.get(path, query_string=query, headers={"Authorization": f"Bearer {token}"})
    return resp.status_code, resp.get_json()


@pytest.mark.parametrize("other", ["token-of-tenant-b-0123", "token-of-domain-b-0123"])
def test_a_cursor_given_to_another_credential_yields_only_its_own_rows(store: Store, other: str) -> None:
    """A /v1/usage cursor tenant A's credential got, presented by another tenant's credential
    (scoped to account B, or to domain B), never yields A's rows: only the caller's own (or a
    400). Regression test: kvmeter narrows every page to the caller again (passes on main)."""
    keyed = Credentials(tokens={token_digest(t): g for t, g in TOKENS.items()})
    client = create_app(
        store, auth=authenticator(store, CredentialSource(keyed), loopback=False)
    ).test_client()
    query = {"start": "2024-05-14", "end": "2024-05-15", "limit": 1}
    status, first = _get(client, "token-of-tenant-a-0123", "/v1/usage", **query)
    assert status == 200, first
    assert first["next"], first
    assert {r["account"] for r in first["usage"]} == {ACCT_A}
    status, body = _get(client, other, "/v1/usage", **query, cursor=first["next"])
    assert status in (200, 400), body
    if status == 200:
        assert {r["account"] for r in body["usage"]} <= {ACCT_B}, body
    # paging on with the other credential never reaches A's rows either
    seen: set[str] = set()
    cursor = first["next"]
    while status == 200 and cursor:
        status, body = _get(client, other, "/v1/usage", **query, cursor=cursor)
        seen |= {r["account"] for r in body["usage"]}
        cursor = body["next"]
    assert seen <= {ACCT_B}, seen
