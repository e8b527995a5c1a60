"""/v1/costs over the real API server: costs worked out by hand for the shared scenario, JSON
and CSV, on SQLite and PostgreSQL; a tenant sees only its own account's costs, whatever it asks."""

from __future__ import annotations

import csv
import io
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from kvmeter.collector.api import ApiServer, authenticator, create_app
from kvmeter.collector.billing import tariff_file
from kvmeter.collector.billing.tariff_file import TariffSource
from kvmeter.collector.credentials import CredentialSource, from_entries
from kvmeter.collector.ingest import ingest_events, ingest_measures
from kvmeter.collector.model import Settings
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store
from tests.api_support import NOW, TARIFF, running
from tests.collector_support import ACCT_A, ACCT_B, IP1, VM1, VM2, Clock, delimited, scenario

OPERATOR, TENANT_A = "operator-token-0123456789", "tenant-a-token-0123456789"
# By hand, from tests.collector_support.expected_usage at NOW (T0 + 5 h):
# A: running 1 h * 0.02, allocated 6 h * 0.001, IP 4.75 h * 0.005, 1200 B sent * 1/kB, 500 B received free
# B: running 5 h * 0.02, allocated 5 h * 0.001, 3000 B sent * 1/kB
COST_A = Decimal("0.02") + Decimal("0.006") + Decimal("0.02375") + Decimal("1.2")
COST_B = Decimal("0.1") + Decimal("0.005") + Decimal("3")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.pg)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    url = f"sqlite:///{tmp_path}/usage.db"
    if request.param == "postgresql":
        url = str(request.getfixturevalue("pg_database"))
    store = Store(url)
    store.migrate()
    collector = Collector(store, Settings(), Clock(NOW))
    sc = scenario()
    (tmp_path / "events.jsonl").write_bytes(b"\n".join(v for _, v in sc.events) + b"\n")
    (tmp_path / "m.pb").write_bytes(delimited(sc.batches))
    ingest_events(collector, tmp_path / "events.jsonl")
    ingest_measures(collector, tmp_path / "m.pb")
    collector.tick()
    yield store
    store.close()


def serve(store: Store, tariffs: TariffSource | None, tmp_path: Path) -> ApiServer:
    creds, problems = from_entries(
        [{"name": "ops", "token": OPERATOR}, {"name": "tenant a", "token": TENANT_A, "accounts": [ACCT_A]}],
        "test",
    )
    assert not problems
    auth = authenticator(store, CredentialSource(creds))
    return ApiServer(create_app(store, auth=auth, tariffs=tariffs), "127.0.0.1", 0)


def tariffs(tmp_path: Path) -> TariffSource:
    path = tmp_path / "tariff.toml"
    return TariffSource(tariff_file.from_dict(TARIFF), path)


def get(base: str, token: str, **params: str) -> tuple[int, str, Any]:
    url = f"{base}/v1/costs?" + urllib.parse.urlencode(params)
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            status, ctype, body = resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as err:
        status, ctype, body = err.code, err.headers["Content-Type"], err.read().decode()
        err.close()
    return status, ctype, json.loads(body) if ctype.startswith("application/json") else body


def test_costs_per_account_by_hand(store: Store, tmp_path: Path) -> None:
    with running(serve(store, tariffs(tmp_path), tmp_path)) as base:
        status, _, body = get(base, OPERATOR, month="2024-05")
        assert status == 200, body
        assert (body["month"], body["currency"], body["count"]) == ("2024-05", "EUR", 2)
        by_account = {a["account"]: a for a in body["accounts"]}
        assert Decimal(by_account[ACCT_A]["cost"]) == COST_A
        assert Decimal(by_account[ACCT_B]["cost"]) == COST_B
        a = by_account[ACCT_A]
        assert a["complete"]
        assert a["unpriced"] == []
        assert a["projected"] == a["cost"]  # the month is over: nothing more to come
        types = {t["usage_type_name"]: Decimal(t["cost"]) for t in a["by_usage_type"]}
        assert types == {
            "RUNNING_VM": Decimal("0.02"),
            "ALLOCATED_VM": Decimal("0.006"),
            "IP_ADDRESS": Decimal("0.02375"),
            "NETWORK_BYTES_SENT": Decimal("1.2"),
            "NETWORK_BYTES_RECEIVED": Decimal(0),
        }
        lines = {(x["usage_type"], x["resource"]): (x["quantity"], x["unit"], x["cost"]) for x in a["lines"]}
        assert lines[(3, IP1)] == (int(4.75 * 3_600_000), "ms", "0.023750")
        assert lines[(4, VM1)] == (1200, "bytes", "1.200000")

        status, ctype, text = get(base, OPERATOR, month="2024-05", format="csv")
        assert status == 200
        assert ctype.startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(text)))
        assert sum(Decimal(r["cost"]) for r in rows) == COST_A + COST_B
        assert {r["account"] for r in rows} == {ACCT_A, ACCT_B}

        status, _, body = get(base, OPERATOR, month="2024-05", account=ACCT_B, items="true")
        items = body["accounts"][0]["items"]
        assert sum(Decimal(i["cost"]) for i in items) == COST_B
        assert {(i["kind"], i["resource"]) for i in items} >= {("record", VM2)}


def test_a_tenant_sees_only_its_own_costs(store: Store, tmp_path: Path) -> None:
    with running(serve(store, tariffs(tmp_path), tmp_path)) as base:
        status, _, body = get(base, TENANT_A, month="2024-05")
        assert status == 200
        assert [a["account"] for a in body["accounts"]] == [ACCT_A]
        assert Decimal(body["accounts"][0]["cost"]) == COST_A
        status, _, body = get(base, TENANT_A, month="2024-05", account=ACCT_B)
        assert status == 403
        assert ACCT_B in body["error"]
        status, _, text = get(base, TENANT_A, month="2024-05", format="csv")
        assert status == 200
        assert {r["account"] for r in csv.DictReader(io.StringIO(text))} == {ACCT_A}
        assert ACCT_B not in text
        assert VM2 not in text
        status, _, body = get(base, TENANT_A, month="2024-05", items="true")  # its one account
        assert status == 200
        assert all(VM2 != i["resource"] for i in body["accounts"][0]["items"])
        status, _, body = get(base, "wrong-token-0123456789", month="2024-05")
        assert status == 401


@pytest.mark.parametrize(
    ("params", "status", "words"),
    [
        ({"month": "2024-13"}, 400, "not a month"),
        ({"month": "May"}, 400, "yyyy-MM"),
        ({"format": "xml"}, 400, "json or csv"),
        ({"items": "yes"}, 400, "true or false"),
        ({"items": "true"}, 400, "account="),  # the operator sees every account: name one
    ],
)
def test_bad_parameters_are_a_400(
    store: Store, tmp_path: Path, params: dict[str, str], status: int, words: str
) -> None:
    with running(serve(store, tariffs(tmp_path), tmp_path)) as base:
        got, _, body = get(base, OPERATOR, **params)
        assert got == status
        assert words in body["error"]


def test_without_a_tariff_costs_are_not_enabled(store: Store, tmp_path: Path) -> None:
    with running(serve(store, None, tmp_path)) as base:
        status, _, body = get(base, OPERATOR)
        assert status == 404
        assert "tariff_file" in body["error"]
