"""A credit is added exactly once under an idempotency key: POST /v1/credits' Idempotency-Key
header and `kvmeter credits add --idempotency-key`, on both stores, through the real HTTP
server, across two API replicas on PostgreSQL, and after an upgrade in place (migration 25)."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from flask.testing import FlaskClient

from kvmeter.cli import main
from kvmeter.collector.api import ApiServer, create_app
from kvmeter.collector.balance_watch import BalanceBook
from kvmeter.collector.balances import Thresholds
from kvmeter.collector.schema_credits import credits
from kvmeter.collector.store import Store, schema_version
from tests.api_support import running
from tests.billing_support import ACCT_A, ACCT_B, tariff
from tests.integration.test_balance_edges import _rebuilt, live_and_into  # noqa: F401 (fixture)
from tests.integration.test_credits_api import OPERATOR, TENANT_A, call, client

KEY = "pay_2026-12-07_000042"


def _key(key: str, token: str = OPERATOR) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Idempotency-Key": key}


def _post(api: FlaskClient, body: dict[str, Any], key: str) -> Any:
    return api.post("/v1/credits", json=body, headers=_key(key))


def _stored(store: Store) -> list[tuple[str, str, str | None]]:
    c = credits.c
    with store.read() as conn:
        rows = conn.execute(sa.select(c.account, c.amount, c.idempotency_key).order_by(c.id)).all()
    return [(str(r[0]), str(r[1]), r[2]) for r in rows]


def test_a_retried_post_with_its_key_adds_the_credit_once(store: Store) -> None:
    """A billing system posts a payment's credit, times out, posts it again with the same
    Idempotency-Key: the second answer is the first credit (same 201, same id, marked
    Idempotent-Replayed), the account holds one credit and its balance counts it once (before:
    the header was ignored, two credits, the tenant's balance doubled)."""
    api = client(store, BalanceBook(store, tariff, Thresholds()))
    body = {"account": ACCT_A, "amount": "25.00", "note": "payment 42"}
    first = _post(api, body, KEY)
    assert first.status_code == 201, first.data
    assert "Idempotent-Replayed" not in first.headers
    again = _post(api, {**body, "amount": "25"}, KEY)  # the same money, written otherwise
    assert again.status_code == 201, again.data
    assert call(api, "GET", "/v1/credits", OPERATOR)[1]["count"] == 1
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert again.get_json() == first.get_json()
    assert first.get_json()["idempotency_key"] == KEY
    assert _stored(store) == [(ACCT_A, "25.00", KEY)]
    status, balances = call(api, "GET", "/v1/balances", TENANT_A)
    assert status == 200
    assert balances["balances"][0]["credits"] == "25.00"


def test_the_same_key_with_another_request_is_refused_and_adds_nothing(store: Store) -> None:
    """The same key with another amount (or note, or currency) is not a retry: a 422 naming
    the key, the credit it added and what differs, and nothing added. Without a key every POST
    is a new credit, as before; a malformed key (a space, too long) is a 400."""
    api = client(store, BalanceBook(store, tariff, Thresholds()))
    assert _post(api, {"account": ACCT_A, "amount": "25.00"}, KEY).status_code == 201
    for other in ({"amount": "250.00"}, {"amount": "25.00", "note": "another"}):
        answer = _post(api, {"account": ACCT_A, **other}, KEY)
        assert answer.status_code == 422, answer.data
        text = answer.get_json()["error"]
        assert KEY in text
        assert "credit 1" in text
        assert ("amount" if "note" not in other else "note") in text
    for bad in ("two words", "k" * 129):
        answer = _post(api, {"account": ACCT_A, "amount": "1"}, bad)
        assert answer.status_code == 400, answer.data
    assert _stored(store) == [(ACCT_A, "25.00", KEY)]


def test_a_key_is_scoped_to_its_account(store: Store) -> None:
    """The same key on another account is that account's own credit: the answer is never the
    first account's credit (a key cannot reveal another account's credit, nor refuse a
    credit because another account used the key)."""
    api = client(store, BalanceBook(store, tariff, Thresholds()))
    a = _post(api, {"account": ACCT_A, "amount": "25.00"}, KEY)
    b = _post(api, {"account": ACCT_B, "amount": "7.00"}, KEY)
    assert (a.status_code, b.status_code) == (201, 201), b.data
    assert "Idempotent-Replayed" not in b.headers
    assert (b.get_json()["account"], b.get_json()["amount"]) == (ACCT_B, "7.00")
    assert b.get_json()["id"] != a.get_json()["id"]
    # Each account's retry is its own credit again.
    assert _post(api, {"account": ACCT_B, "amount": "7.00"}, KEY).get_json() == b.get_json()
    assert _post(api, {"account": ACCT_A, "amount": "25.00"}, KEY).get_json() == a.get_json()
    assert call(api, "GET", "/v1/credits", OPERATOR)[1]["count"] == 2
    assert _stored(store) == [(ACCT_A, "25.00", KEY), (ACCT_B, "7.00", KEY)]


def test_the_cli_adds_a_credit_once_under_its_key(store_url: str, tmp_path: Path) -> None:
    """`kvmeter credits add --idempotency-key K` run twice (an operator's script retried) adds
    one credit and shows it both times; the same key with another amount fails and adds
    nothing; the API's retry with that key answers the CLI's credit (one key space)."""
    config = tmp_path / "collector.toml"
    config.write_text(f'[store]\nurl = "{store_url}"\n')
    add = ["credits", "add", "--config", str(config), "--account", ACCT_A, "--currency", "EUR"]
    keyed = [*add, "--amount", "10.00", "--idempotency-key", KEY, "--format", "json"]
    first = CliRunner().invoke(main, keyed)
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(main, keyed)
    assert again.exit_code == 0, again.output
    assert json.loads(again.output) == json.loads(first.output)
    text = CliRunner().invoke(main, [*add, "--amount", "10.00", "--idempotency-key", KEY])
    assert text.exit_code == 0, text.output
    assert "added before" in text.output
    other = CliRunner().invoke(main, [*add, "--amount", "99", "--idempotency-key", KEY])
    assert other.exit_code != 0
    assert KEY in other.output
    store = Store(store_url)
    try:
        api = create_app(store, token=OPERATOR).test_client()
        answer = _post(api, {"account": ACCT_A, "amount": "10.00", "currency": "EUR"}, KEY)
        assert answer.status_code == 201, answer.data
        assert answer.get_json()["id"] == json.loads(first.output)["id"]
        assert _stored(store) == [(ACCT_A, "10.00", KEY)]
    finally:
        store.close()


def _http_post(base: str, key: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], str | None]:
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=20)
    try:
        conn.request(
            "POST", "/v1/credits", json.dumps(body), {**_key(key), "Content-Type": "application/json"}
        )
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read()), resp.getheader("Idempotent-Replayed")
    finally:
        conn.close()


@pytest.fixture
def replicas(pg_database: str) -> Iterator[list[tuple[Store, str]]]:
    """Two API replicas (real HTTP servers) on one PostgreSQL store."""
    with ExitStack() as stack:
        started = []
        for _ in range(2):
            store = Store(pg_database)
            store.migrate()
            stack.callback(store.close)
            app = create_app(store, token=OPERATOR, balances=BalanceBook(store, tariff, Thresholds()))
            started.append((store, stack.enter_context(running(ApiServer(app, "127.0.0.1", 0)))))
        yield started


@pytest.mark.pg
def test_two_replicas_taking_one_key_at_once_add_one_credit(replicas: list[tuple[Store, str]]) -> None:
    """A billing system's retry reaches the other replica while the first is still adding the
    credit: the posts of one key to both replicas at once add one credit, and every answer is
    that credit."""
    body = {"account": ACCT_A, "amount": "25.00"}
    gate = threading.Barrier(6)
    answers: list[tuple[int, dict[str, Any], str | None]] = []

    def post(base: str) -> None:
        gate.wait()
        answers.append(_http_post(base, KEY, body))

    threads = [threading.Thread(target=post, args=(replicas[i % 2][1],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert [a[0] for a in answers] == [201] * 6, answers
    assert len({a[1]["id"] for a in answers}) == 1
    assert sorted(a[2] or "" for a in answers) == [""] + ["true"] * 5
    assert _stored(replicas[0][0]) == [(ACCT_A, "25.00", KEY)]


@pytest.mark.pg
def test_a_replica_waits_on_a_key_another_is_adding_then_answers_its_credit(
    replicas: list[tuple[Store, str]],
) -> None:
    """Replica A has inserted a key's credit and not yet committed; replica B's retry finds
    nothing to read, so its insert waits on the store's unique (account, key) until A commits,
    then answers A's credit (replayed) instead of adding a second one."""
    (store_a, _), (_, base_b) = replicas
    answers: list[tuple[int, dict[str, Any], str | None]] = []
    with store_a.write() as conn:  # replica A, inside its request's transaction
        row = {"account": ACCT_A, "amount": "25.00", "currency": "EUR", "note": "", "created_by": "ops"}
        conn.execute(sa.insert(credits).values(**row, created_ms=1, idempotency_key=KEY))
        retry = threading.Thread(
            target=lambda: answers.append(_http_post(base_b, KEY, {"account": ACCT_A, "amount": "25.00"}))
        )
        retry.start()
        deadline = time.monotonic() + 5
        waiting = (
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE wait_event_type = 'Lock' AND datname = current_database()"
        )
        with store_a.engine.connect() as watch:
            while not watch.execute(sa.text(waiting)).scalar() and retry.is_alive():
                assert time.monotonic() < deadline, "replica B never waited on replica A's key"
                time.sleep(0.02)
                watch.rollback()  # a fresh snapshot of pg_stat_activity each time
        assert retry.is_alive(), answers  # B held by A's uncommitted key, not answered already
    retry.join(10)
    [(status, credit, replayed)] = answers
    assert (status, replayed, credit["amount"], credit["created_by"]) == (201, "true", "25.00", "ops")
    assert _stored(store_a) == [(ACCT_A, "25.00", KEY)]


def test_an_upgraded_store_keeps_its_credits_and_takes_keys(store_url: str) -> None:
    """A store from before migration 25 (credits without keys) upgraded in place: its credits
    stay, with no key; keyed credits then add once (migration 25 adds the column and the unique
    (account, key) index on SQLite and PostgreSQL alike)."""
    store = Store(store_url)
    store.migrate()
    with store.write() as conn:  # as migration 24 left it
        conn.execute(sa.text("DROP INDEX ux_credits_idempotency_key"))
        conn.execute(sa.text("ALTER TABLE credits DROP COLUMN idempotency_key"))
        conn.execute(sa.delete(schema_version).where(schema_version.c.version == 25))
        old = "INSERT INTO credits (account, amount, currency, note, created_by, created_ms) VALUES "
        conn.execute(
            sa.text(old + f"('{ACCT_A}', '5', 'EUR', '', 'ops', 1), ('{ACCT_A}', '6', 'EUR', '', 'ops', 2)")
        )
    store.close()
    upgraded = Store(store_url)
    upgraded.migrate()
    try:
        api = create_app(upgraded, token=OPERATOR).test_client()
        for _ in range(2):
            answer = _post(api, {"account": ACCT_A, "amount": "7", "currency": "EUR"}, KEY)
            assert answer.status_code == 201, answer.data
        assert _stored(upgraded) == [(ACCT_A, "5", None), (ACCT_A, "6", None), (ACCT_A, "7", KEY)]
        assert call(api, "GET", "/v1/credits", OPERATOR)[1]["count"] == 3
    finally:
        upgraded.close()


def test_a_rebuilt_store_still_knows_the_keys(
    live_and_into: tuple[Store, str],  # noqa: F811 - the fixture
) -> None:
    """A rebuild carries the credits with their keys: a billing system's retry that reaches
    the rebuilt store once it is in service answers the credit added before the rebuild, and
    adds nothing."""
    live, into_url = live_and_into
    body = {"account": ACCT_A, "amount": "25.00", "currency": "EUR"}
    first = _post(create_app(live, token=OPERATOR).test_client(), body, KEY)
    assert first.status_code == 201, first.data
    into = _rebuilt(live, into_url)
    try:
        retry = _post(create_app(into, token=OPERATOR).test_client(), body, KEY)
        assert retry.status_code == 201, retry.data
        assert retry.get_json() == first.get_json()
        assert _stored(into) == [(ACCT_A, "25.00", KEY)]
    finally:
        into.close()
