"""/v1 pages and scopes, over real HTTP: a cursor walks every record once in a stable order,
pages are bounded by default, and a caller scoped to accounts reads only those accounts."""

from __future__ import annotations

import csv
import io
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask, g, request

from kvmeter.collector.api import ApiServer, create_app
from kvmeter.collector.api_auth import Principal
from kvmeter.collector.api_params import DEFAULT_PAGE, MAX_PAGE
from kvmeter.collector.service import Collector
from tests.api_support import NOW, filled_store, running
from tests.collector_support import ACCT_A, ACCT_B, HOUR, T0, VM1, VM2, usage_event

SCOPE_HEADER = "X-Test-Accounts"  # the test app's stand-in for a scoped credential


def with_test_principal(app: Flask) -> Flask:
    """Set flask.g.principal from a test header, as a scoped credential would."""

    @app.before_request
    def _principal() -> None:
        accounts = request.headers.get(SCOPE_HEADER)
        if accounts is not None:
            g.principal = Principal("tenant", frozenset(a for a in accounts.split(",") if a))

    return app


class Client:
    def __init__(self, base: str):
        self.base = base

    def get(self, path: str, scope: str | None = None, **params: str) -> tuple[int, dict[str, str], str]:
        return self.open(f"{path}?{urllib.parse.urlencode(params)}", scope)

    def open(self, target: str, scope: str | None = None) -> tuple[int, dict[str, str], str]:
        req = urllib.request.Request(f"{self.base}{target}")
        if scope is not None:
            req.add_header(SCOPE_HEADER, scope)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, dict(resp.headers), resp.read().decode()
        except urllib.error.HTTPError as err:
            body = err.read().decode()
            err.close()
            return err.code, dict(err.headers), body

    def json(self, path: str, scope: str | None = None, **params: str) -> dict:
        status, _, body = self.get(path, scope, **params)
        assert status == 200, body
        return json.loads(body)

    def walk(self, path: str, items: str, scope: str | None = None, **params: str) -> list[list[dict]]:
        """Every page, following `next`."""
        pages = []
        while True:
            doc = self.json(path, scope, **params)
            assert doc["count"] == len(doc[items])
            pages.append(doc[items])
            if doc["next"] is None:
                return pages
            params["cursor"] = doc["next"]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Client, Collector]]:
    store, collector = filled_store(tmp_path)
    server = ApiServer(with_test_principal(create_app(store)), "127.0.0.1", 0)
    with running(server) as base:
        yield Client(base), collector
    store.close()


WHOLE = {"start": "2024-05-14", "end": "2024-05-15"}


def test_a_cursor_walks_every_record_once_in_a_stable_order(served: tuple[Client, Collector]) -> None:
    client, _ = served
    whole = client.json("/v1/usage", **WHOLE, limit=str(MAX_PAGE))
    assert whole["next"] is None
    assert whole["count"] > 21
    pages = client.walk("/v1/usage", "usage", **WHOLE, limit="7")
    assert all(len(p) == 7 for p in pages[:-1])
    assert 1 <= len(pages[-1]) <= 7
    assert [r for p in pages for r in p] == whole["usage"]
    starts = [r["start_ms"] for r in whole["usage"]]
    assert starts == sorted(starts)
    # The same query asked twice pages the same way; filters page too.
    assert client.walk("/v1/usage", "usage", **WHOLE, limit="7") == pages
    mine = [
        r for p in client.walk("/v1/usage", "usage", **WHOLE, limit="3", account=ACCT_B, type="1") for r in p
    ]
    assert [r["start_ms"] for r in mine] == list(range(T0, NOW, HOUR))


def test_csv_pages_carry_the_next_page_in_a_link_header(served: tuple[Client, Collector]) -> None:
    client, _ = served
    status, headers, body = client.get("/v1/usage", **WHOLE, limit="5", format="csv")
    assert status == 200
    assert len(list(csv.DictReader(io.StringIO(body)))) == 5
    link = headers["Link"]
    assert link.startswith("</v1/usage?")
    assert link.endswith('>; rel="next"')
    status, headers, body = client.open(link[1 : link.index(">")])
    assert status == 200
    assert len(list(csv.DictReader(io.StringIO(body)))) == 5
    assert headers["Content-Type"].startswith("text/csv")
    last = client.json("/v1/usage", **WHOLE, limit=str(MAX_PAGE))
    status, headers, _ = client.get("/v1/usage", **WHOLE, limit=str(MAX_PAGE), format="csv")
    assert last["next"] is None
    assert "Link" not in headers


def test_pages_are_bounded_by_default(tmp_path: Path) -> None:
    store, collector = filled_store(tmp_path)
    vm_start = usage_event("VM.START", "9b1f0000-0000-4000-8000-0000000000vm9", ACCT_A, T0)
    collector.apply_event(vm_start[1], vm_start[0])
    collector.clock.now = T0 + (DEFAULT_PAGE + 100) * HOUR  # type: ignore[attr-defined]
    collector.tick()  # an hourly record for every hour it runs: more than a default page
    with running(ApiServer(create_app(store), "127.0.0.1", 0)) as base:
        client = Client(base)
        params = {"start": "2024-05-01", "end": "2025-01-01"}
        first = client.json("/v1/usage", **params)
        assert first["count"] == DEFAULT_PAGE
        assert first["next"]
        rest = client.walk("/v1/usage", "usage", **params, cursor=first["next"])
        total = DEFAULT_PAGE + sum(len(p) for p in rest)
        assert total == sum(len(p) for p in client.walk("/v1/usage", "usage", **params, limit="400"))
        assert total > DEFAULT_PAGE + 100
    store.close()


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"limit": "0"}, "limit must be between 1 and 10000"),
        ({"limit": "10001"}, "limit must be between 1 and 10000"),
        ({"limit": "٣"}, "limit must be an integer of digits 0-9"),
        ({"cursor": "garbage"}, "is not one this API gave"),
        ({"cursor": "W10"}, "is not one this API gave"),  # base64 of []
        ({"cursor": "x" * 201}, "is not one this API gave"),
    ],
)
def test_bad_paging_parameters_are_400(served: tuple[Client, Collector], params: dict, says: str) -> None:
    client, _ = served
    status, _, body = client.get("/v1/usage", **WHOLE, **params)
    assert status == 400
    assert says in json.loads(body)["error"]


def test_a_cursor_only_continues_the_query_that_gave_it(served: tuple[Client, Collector]) -> None:
    client, _ = served
    cursor = client.json("/v1/usage", **WHOLE, limit="5")["next"]
    assert client.get("/v1/usage", **WHOLE, limit="9", cursor=cursor)[0] == 200  # another page size is fine
    for other in ({"account": ACCT_A}, {"type": "1"}, {"end": "2024-05-16"}):
        status, _, body = client.get("/v1/usage", **{**WHOLE, **other}, cursor=cursor)
        assert status == 400, other
        assert "is not one this API gave for this query" in json.loads(body)["error"]
    assert client.get("/v1/adjustments", since="2024-05-14", cursor=cursor)[0] == 400


def test_a_scoped_caller_reads_only_its_accounts(served: tuple[Client, Collector]) -> None:
    client, _ = served
    everything = client.json("/v1/usage", **WHOLE, limit=str(MAX_PAGE))["usage"]
    assert {r["account"] for r in everything} >= {ACCT_A, ACCT_B}
    mine = [r for p in client.walk("/v1/usage", "usage", scope=ACCT_A, **WHOLE, limit="4") for r in p]
    assert mine == [r for r in everything if r["account"] == ACCT_A]
    assert (
        client.json("/v1/usage", scope=ACCT_A, **WHOLE, account=ACCT_A, limit=str(MAX_PAGE))["usage"] == mine
    )
    for account in (ACCT_B, "", "nobody"):
        if not account:
            continue
        status, headers, body = client.get("/v1/usage", scope=ACCT_A, **WHOLE, account=account)
        assert status == 403
        assert headers["Content-Type"].startswith("application/json")
        assert "may not read account" in json.loads(body)["error"]
    # A resource of another account is no way around the scope: it is simply not there.
    assert client.json("/v1/usage", scope=ACCT_A, **WHOLE, resource=VM2)["usage"] == []
    # Scoped to nothing: nothing, on every endpoint.
    assert client.json("/v1/usage", scope="", **WHOLE)["usage"] == []
    assert client.json("/v1/adjustments", scope="", since="2024-05-14")["adjustments"] == []
    assert client.get("/v1/adjustments", scope=ACCT_A, since="2024-05-14", account=ACCT_B)[0] == 403


def test_adjustments_page_and_scope(served: tuple[Client, Collector]) -> None:
    client, collector = served
    collector.clock.now = NOW + HOUR  # type: ignore[attr-defined]
    for event in (("VM.STOP", VM2, ACCT_B, T0 + 90 * 60_000), ("VM.STOP", VM1, ACCT_A, T0 + 45 * 60_000)):
        key, value = usage_event(*event)
        collector.apply_event(value, key)
    whole = client.json("/v1/adjustments", since="2024-05-14", limit=str(MAX_PAGE))
    assert whole["next"] is None
    assert {r["account"] for r in whole["adjustments"]} == {ACCT_A, ACCT_B}
    assert len(whole["adjustments"]) >= 3
    pages = client.walk("/v1/adjustments", "adjustments", since="2024-05-14", limit="1")
    assert [r for p in pages for r in p] == whole["adjustments"]
    theirs = [r for p in client.walk("/v1/adjustments", "adjustments", scope=ACCT_B, since="2024-05-14",
                                     limit="1") for r in p]  # fmt: skip
    assert theirs == [r for r in whole["adjustments"] if r["account"] == ACCT_B]
