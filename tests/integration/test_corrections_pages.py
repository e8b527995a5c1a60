"""GET /v1/corrections a page at a time, as /v1/usage pages: `limit` (the configured default and
largest), `next` and a Link header, a cursor that continues only its own query, and every read
narrowed to the caller's accounts; on both stores. Corrections are stored as the reconciler
stores them: their event applied through the collector, then the correction row."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest
from flask.testing import FlaskClient

from kvmeter.collector.api_params import Paging
from kvmeter.collector.correction import Correction
from kvmeter.collector.model import Settings
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store
from kvmeter.collector.store.reconciliation import save_corrections
from tests.collector_support import ACCT_A, ACCT_B, HOUR, T0, Clock
from tests.integration.test_cloudstack_api import scoped_app

NOW = T0 + 6 * HOUR
# Seven IP assignments the bus lost; three share a time, so order inside a time matters.
CORRECTIONS = [
    Correction(f"41aa0000-0000-4000-8000-00000000ip{i:02d}", "IpAddress", "NET.IPASSIGN",
               T0 + (i // 3) * HOUR, ACCT_A if i % 4 else ACCT_B, f"listed by CloudStack, no event ({i})")
    for i in range(7)
]  # fmt: skip


def add_corrections(store: Store, corrections: Sequence[Correction], now_ms: int) -> None:
    collector = Collector(store, Settings(), Clock(now_ms))
    for c in corrections:
        collector.apply_event(c.event_value(), c.resource_uuid.encode())
    with store.write() as conn:
        assert save_corrections(conn, corrections, now_ms) == len(corrections)
        assert save_corrections(conn, corrections, now_ms) == 0  # known event ids are kept


@pytest.fixture
def client(store: Store) -> FlaskClient:
    add_corrections(store, CORRECTIONS, NOW)
    return scoped_app(store, paging=Paging(page_size=2, max_page_size=3)).test_client()


def get(client: FlaskClient, accounts: str | None = None, **params: str) -> tuple[int, dict[str, Any], str]:
    headers = {"X-Test-Accounts": accounts} if accounts is not None else {}
    resp = client.get("/v1/corrections", query_string=params, headers=headers)
    return resp.status_code, json.loads(resp.data), resp.headers.get("Link", "")


def walk(client: FlaskClient, accounts: str | None = None, **params: str) -> list[list[dict[str, Any]]]:
    pages = []
    while True:
        status, body, link = get(client, accounts, **params)
        assert status == 200, body
        assert body["count"] == len(body["corrections"])
        pages.append(body["corrections"])
        if body["next"] is None:
            assert link == ""
            return pages
        assert f"cursor={body['next']}" in link
        params["cursor"] = body["next"]


def order(corrections: Sequence[Correction]) -> list[tuple[int, str]]:
    return [(c.time_ms, c.resource_uuid) for c in corrections]


def test_pages_of_the_default_size_walk_every_correction_once_in_time_order(client: FlaskClient) -> None:
    pages = walk(client)
    assert [len(p) for p in pages] == [2, 2, 2, 1]  # page_size 2, no empty last page
    rows = [r for p in pages for r in p]
    assert sorted((r["time_ms"], r["resource"]) for r in rows) == sorted(order(CORRECTIONS))
    assert [r["time_ms"] for r in rows] == sorted(r["time_ms"] for r in rows)
    assert len({r["event_id"] for r in rows}) == len(CORRECTIONS)
    assert {r["reason"] for r in rows} == {c.reason for c in CORRECTIONS}
    assert [len(p) for p in walk(client, limit="3")] == [3, 3, 1]


def test_the_largest_limit_and_cursors_are_checked(client: FlaskClient) -> None:
    status, body, _ = get(client, limit="4")
    assert (status, "limit must be between 1 and 3" in body["error"]) == (400, True)
    _, first, _ = get(client)
    status, body, _ = get(client, account=ACCT_A, cursor=first["next"])  # another query's cursor
    assert (status, "is not one this API gave" in body["error"]) == (400, True)
    status, _, _ = get(client, cursor="garbage")
    assert status == 400


def test_filters_and_scope_narrow_the_pages(client: FlaskClient) -> None:
    mine = [c for c in CORRECTIONS if c.account == ACCT_A]
    for accounts, params in ((None, {"account": ACCT_A}), (ACCT_A, {})):
        rows = [r for p in walk(client, accounts, **params) for r in p]
        assert sorted((r["time_ms"], r["resource"]) for r in rows) == sorted(order(mine))
        assert {r["accountid"] for r in rows} == {ACCT_A}
    status, _, _ = get(client, ACCT_A, account=ACCT_B)
    assert status == 403
    window = [c for c in CORRECTIONS if T0 + HOUR <= c.time_ms < T0 + 2 * HOUR]
    rows = [r for p in walk(client, start=str(T0 + HOUR), end=str(T0 + 2 * HOUR)) for r in p]
    assert sorted((r["time_ms"], r["resource"]) for r in rows) == sorted(order(window))
    one = CORRECTIONS[4]
    assert [r["event_id"] for p in walk(client, resource=one.resource_uuid) for r in p] == [one.event_id]
