"""An account's credits share one currency even when its first credits are added at once: two
API replicas, or an API and `kvmeter credits add`, on one PostgreSQL store without a tariff
(each credit names its currency), with and without idempotency keys."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from kvmeter.cli import main
from kvmeter.collector import credit_keys
from kvmeter.collector.api import ApiServer, create_app
from kvmeter.collector.schema_credits import credits
from kvmeter.collector.store import Store
from tests.api_support import running
from tests.billing_support import ACCT_A, ACCT_B
from tests.integration.test_credits_api import OPERATOR

pytestmark = pytest.mark.pg


@pytest.fixture
def pg_store(pg_database: str) -> Iterator[Store]:
    store = Store(pg_database)
    store.migrate()
    yield store
    store.close()


def _currencies(store: Store) -> list[tuple[str, str]]:
    c = credits.c
    with store.read() as conn:
        rows = conn.execute(sa.select(c.amount, c.currency).where(c.account == ACCT_A).order_by(c.id)).all()
    return [(str(r[0]), str(r[1])) for r in rows]


def _while_first_credit_uncommitted(store: Store, key: str | None, other: Callable[[], Any]) -> list[Any]:
    """Replica A adds ACCT_A's first credit, 10 EUR (with `key`), and holds its transaction
    open while `other` runs in a thread, until `other` waits on a lock or is done; then A
    commits. Returns what `other` returned."""
    done: list[Any] = []
    with store.write() as conn:  # replica A, inside its request's transaction
        credit_keys.add_once(conn, ACCT_A, Decimal("10"), "EUR", "", "ops", 1, key)
        racer = threading.Thread(target=lambda: done.append(other()))
        racer.start()
        waiting = (
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE wait_event_type = 'Lock' AND datname = current_database()"
        )
        deadline = time.monotonic() + 5
        with store.engine.connect() as watch:
            while racer.is_alive() and time.monotonic() < deadline:
                if watch.execute(sa.text(waiting)).scalar():
                    break
                watch.rollback()  # a fresh snapshot of pg_stat_activity each time
                time.sleep(0.02)
    racer.join(10)
    return done


def _post(base: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """POST /v1/credits without an Idempotency-Key, over real HTTP."""
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=20)
    try:
        headers = {"Authorization": f"Bearer {OPERATOR}", "Content-Type": "application/json"}
        conn.request("POST", "/v1/credits", json.dumps(body), headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_two_replicas_adding_first_credits_in_two_currencies_at_once_keep_one(
    pg_store: Store, pg_database: str
) -> None:
    """Without a tariff, replica A adds an account's first credit in EUR and, before A
    commits, replica B is asked for one in USD: B waits for A and refuses its credit with a
    409 naming the account's EUR, adding nothing; the account's credits stay in one currency
    (else the credits of one of them counted in no balance)."""
    replica_b = Store(pg_database)
    try:
        app = create_app(replica_b, token=OPERATOR)
        with running(ApiServer(app, "127.0.0.1", 0)) as base:
            body = {"account": ACCT_A, "amount": "99", "currency": "USD"}
            [(status, answer)] = _while_first_credit_uncommitted(pg_store, None, lambda: _post(base, body))
    finally:
        replica_b.close()
    assert (status, "holds credits in EUR" in answer.get("error", "")) == (409, True), answer
    assert _currencies(pg_store) == [("10", "EUR")]


def test_the_cli_adding_a_keyed_credit_in_another_currency_at_once_adds_nothing(
    pg_store: Store, pg_database: str, tmp_path: Path
) -> None:
    """An API replica adds an account's first credit (10 EUR, idempotency key pay-1) and,
    before it commits, an operator runs `kvmeter credits add --currency USD
    --idempotency-key pay-2` on the same account: the CLI waits, then fails naming EUR, and
    adds nothing (a key is per credit: another key does not make another currency right)."""
    config = tmp_path / "collector.toml"
    config.write_text(f'[store]\nurl = "{pg_database}"\n')
    args = ["credits", "add", "--config", str(config), "--account", ACCT_A, "--amount", "99"]
    args += ["--currency", "USD", "--idempotency-key", "pay-2"]
    [result] = _while_first_credit_uncommitted(pg_store, "pay-1", lambda: CliRunner().invoke(main, args))
    assert (result.exit_code != 0, "holds credits in EUR" in result.output) == (True, True), result.output
    assert _currencies(pg_store) == [("10", "EUR")]


def test_two_accounts_first_credits_without_a_tariff_in_two_currencies_at_once_keep_one(
    pg_store: Store,
) -> None:
    """Without a tariff the store's credits say its currency: ACCT_A's first credit, 10 EUR, is
    being added when ACCT_B's first, in USD, is added through the CLI without a config (so no
    tariff). Each locked only its own account, so B read no credit and was added: the store held
    EUR and USD, one of them in no balance under any tariff. B now waits for A and is refused."""

    def add_b() -> Any:
        return CliRunner().invoke(
            main,
            [
                "credits",
                "add",
                "--db",
                pg_store.url,
                "--account",
                ACCT_B,
                "--amount",
                "5",
                "--currency",
                "USD",
            ],
        )

    [result] = _while_first_credit_uncommitted(pg_store, None, add_b)
    assert result.exit_code == 1, result.output
    assert ("EUR" in result.output, "not USD" in result.output) == (True, True), result.output
    c = credits.c
    with pg_store.read() as conn:
        held = conn.execute(sa.select(c.account, c.currency).order_by(c.id)).all()
    assert [tuple(r) for r in held] == [(ACCT_A, "EUR")]
