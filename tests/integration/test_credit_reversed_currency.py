"""An account whose credits all cancel (a wrong-currency first credit reversed) holds no
currency: it takes its first credit again, in the right one, on both stores; its balance counts
its costs from its first credit, whatever its currency; and a first credit's check reads the
credits of accounts holding another currency only, not the store's every row."""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from kvmeter.cli import main
from kvmeter.collector import credit_keys
from kvmeter.collector.balance_watch import BalanceBook
from kvmeter.collector.balances import Thresholds
from kvmeter.collector.store import Store
from kvmeter.collector.store import credits as stored
from tests.billing_support import ACCT_A, ACCT_B, GB, Cloud, tariff
from tests.integration.test_costs_front import write_tariff
from tests.integration.test_credits_api import OPERATOR, TENANT_A, call, client

DAY_MS = 86_400_000


def test_a_reversed_wrong_currency_first_credit_lets_the_right_one_in(store_url: str, tmp_path: Path) -> None:
    """ACCT_A's first credit, 100 USD, was added by mistake (`--db`, no tariff; the store held no
    credit). The config's tariff is in EUR: 5 EUR is refused ("holds credits in USD"), so the
    operator reverses credit 1. The account now holds no money in any currency: 92 EUR is taken
    from the CLI and 3 EUR from POST /v1/credits (both were a refusal: the account kept its
    first currency once reversed, with no way out), its balance is 95 EUR, no mixed-currency
    account is counted, and USD is refused now that EUR is held, for it and, the store's
    credits being in EUR, for a new account's first credit."""
    store = Store(store_url)
    store.migrate()
    write_tariff(tmp_path / "tariff.toml")
    config = tmp_path / "collector.toml"
    config.write_text(f'[store]\nurl = "{store_url}"\n[billing]\ntariff_file = "tariff.toml"\n')

    def run(*args: str, db: bool = False) -> tuple[int, str]:
        where = ["--db", store_url] if db else ["--config", str(config)]
        result = CliRunner().invoke(main, ["credits", *args, *where])
        return result.exit_code, result.output

    try:
        assert run("add", "--account", ACCT_A, "--amount", "100", "--currency", "USD", db=True)[0] == 0
        code, out = run("add", "--account", ACCT_A, "--amount", "5")
        assert (code, "holds credits in USD, not EUR" in out) == (1, True), out
        assert run("reverse", "--credit", "1") == (0, f"credit 2: -100 USD to {ACCT_A}\n")
        code, out = run("add", "--account", ACCT_A, "--amount", "92", "--note", "credit 1 in EUR")
        assert code == 0, out
        app = client(store, BalanceBook(store, tariff, Thresholds()))
        status, body = call(app, "POST", "/v1/credits", OPERATOR, json={"account": ACCT_A, "amount": "3"})
        assert (status, body.get("currency")) == (201, "EUR"), body
        status, body = call(app, "GET", f"/v1/balances?account={ACCT_A}", TENANT_A)
        assert (status, body["balances"][0]["balance"], body["balances"][0]["currency"]) == (
            200,
            "95.00",
            "EUR",
        ), body
        assert store.stats(0)["mixed_currency_accounts"] == 0
        code, out = run("add", "--account", ACCT_A, "--amount", "1", "--currency", "USD", db=True)
        assert (code, "holds credits in EUR, not USD" in out) == (1, True), out
        code, out = run("add", "--account", ACCT_B, "--amount", "1", "--currency", "USD", db=True)
        assert (code, "the store's credits are in EUR (1 account(s)" in out) == (1, True), out
    finally:
        store.close()


def test_an_account_whose_credits_all_cancel_has_a_balance_from_its_first_credit(store: Store) -> None:
    """ACCT_A sent 4 GB this month (4.00 EUR under the EUR tariff); its first credit, 100 USD
    this month, is reversed. It holds no money: its balance is -4.00 EUR, watched like any
    other (it was refused as "holds credits in USD", unwatched, while it spent). 50 EUR added
    a month later (the credit the USD one should have been) makes it 46.00 EUR: its costs still
    count from its first credit's month, never only from the EUR credit's (which left this
    month's 4.00 out)."""
    cloud = Cloud(store)
    cloud.send(ACCT_A, 4 * GB)
    now, later = cloud.now, cloud.now + 35 * DAY_MS
    with store.write() as conn:
        wrong, _ = credit_keys.add_once(conn, ACCT_A, Decimal(100), "USD", "", "ops", now, unguarded=True)
        credit_keys.reverse_once(conn, wrong["id"], "wrong currency", "ops", now)
    book = BalanceBook(store, tariff, Thresholds(default=Decimal(0)))
    found, refused = book.read(None, cloud.now)
    assert (refused, [(b.account, b.balance, b.currency) for b in found]) == (
        {},
        [(ACCT_A, Decimal("-4.00"), "EUR")],
    )
    assert [x.account for x in book.evaluate(cloud.now)] == [ACCT_A]
    with store.write() as conn:
        credit_keys.add_once(conn, ACCT_A, Decimal(50), "EUR", "", "ops", later)
    [balance] = book.balances(None, later)
    assert (balance.balance, balance.currency) == (Decimal("46.00"), "EUR")


def test_a_first_credit_check_reads_no_whole_credits_table(tmp_path: Path) -> None:
    """A new account's first credit without a tariff (the CLI's `--db`) checks the store's
    credits' currency. It read every credit row (SQLite: `SCAN credits`), millions in a large
    store; now each statement on credits searches an index (the account's, ix_credits_currency
    for the accounts holding another currency), with the same answers: EUR is taken, USD is
    refused naming the EUR accounts (one whose USD credits cancel is not one)."""
    store = Store(f"sqlite:///{tmp_path}/usage.db")
    store.migrate()
    with store.write() as conn:
        for n in range(20):
            stored.add_credit(conn, f"acct-{n}", Decimal(10), "EUR", "", "ops", 1000 + n)
        stored.add_credit(conn, "acct-usd", Decimal(5), "USD", "", "ops", 2000)
        stored.add_credit(conn, "acct-usd", Decimal(-5), "USD", "", "ops", 2001)
    statements: list[tuple[str, Any]] = []

    def seen(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        if " credits" in statement and statement.lstrip().upper().startswith("SELECT"):
            statements.append((statement, params))

    sa.event.listen(store.engine, "before_cursor_execute", seen)
    try:
        with store.write() as conn:
            credit_keys.add_once(conn, ACCT_A, Decimal(1), "EUR", "", "ops", 3000, unguarded=True)
            with pytest.raises(
                credit_keys.CurrencyHeld, match=re.escape("credits are in EUR (21 account(s)")
            ):
                credit_keys.add_once(conn, ACCT_B, Decimal(1), "USD", "", "ops", 3000, unguarded=True)
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", seen)
    assert statements
    with store.read() as conn:
        plans = {
            statement: [
                str(row[-1]) for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", params)
            ]
            for statement, params in statements
        }
    store.close()
    scans = {
        statement: plan
        for statement, plan in plans.items()
        if any(p.startswith("SCAN credits") for p in plan)
    }
    assert scans == {}, scans
