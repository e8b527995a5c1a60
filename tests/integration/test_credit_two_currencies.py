"""Accounts that already hold credits in two currencies (two first credits added at once on
PostgreSQL before a credit took its account's lock, 3df4adb): a balance counts one currency, so
theirs is refused with both currencies named (never a number that leaves a credit out, never a
low-balance alert from one), the store's gauge counts them for an alert rule, and an operator
takes the wrong currency's credit out with `kvmeter credits reverse`, on both stores."""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvmeter.cli import main
from kvmeter.collector.api import create_app
from kvmeter.collector.balance_watch import BalanceBook
from kvmeter.collector.balances import Thresholds
from kvmeter.collector.metrics import Metrics
from kvmeter.collector.store import Store
from kvmeter.collector.store import credits as stored
from tests.billing_support import ACCT_A, ACCT_B, GB, Cloud, tariff
from tests.integration.test_costs_front import write_tariff
from tests.integration.test_credits_api import OPERATOR, TENANT_A, call, client
from tests.monitoring_support import RULE_TESTS, alert_rules

MIXED = "kvmeter_store_mixed_currency_accounts"


def as_the_old_race_left_it(store: Store, *credits: tuple[str, str, str]) -> None:
    """Credits (account, amount, currency) written as two replicas without the account's lock
    wrote them: straight into the store, no currency check."""
    with store.write() as conn:
        for n, (account, amount, currency) in enumerate(credits):
            stored.add_credit(conn, account, Decimal(amount), currency, "", "ops", 1000 + n)


@pytest.mark.parametrize("first", ["EUR", "USD"])
def test_the_balance_of_an_account_holding_two_currencies_is_refused_naming_both(
    store: Store, first: str
) -> None:
    """ACCT_A holds 10 in `first` then 99 in the other (the tariff is in EUR); ACCT_B 3 EUR.
    Its balance asked alone is a 409 naming EUR and USD (it was a 200 counting the first
    currency's credits only: 6.00 EUR, the 99 USD left out, or no balance at all, as if it had
    no credits); listed, it is under `refused` with that reason, the other accounts' balances
    as before."""
    cloud = Cloud(store)
    cloud.send(ACCT_A, 4 * GB)
    cloud.send(ACCT_B, 1 * GB)
    other = {"EUR": "USD", "USD": "EUR"}[first]
    as_the_old_race_left_it(store, (ACCT_A, "10", first), (ACCT_A, "99", other), (ACCT_B, "3", "EUR"))
    app = client(store, BalanceBook(store, tariff, Thresholds()))

    status, body = call(app, "GET", f"/v1/balances?account={ACCT_A}", TENANT_A)
    assert status == 409, body
    assert (f"{first} and {other}" in body["error"], ACCT_A in body["error"]) == (True, True), body
    status, body = call(app, "GET", "/v1/balances", TENANT_A)
    assert (status, body["balances"], [r["account"] for r in body["refused"]]) == (200, [], [ACCT_A]), body
    status, body = call(app, "GET", "/v1/balances", OPERATOR)
    assert [(b["account"], b["balance"]) for b in body["balances"]] == [(ACCT_B, "2.00")], body
    assert [r["account"] for r in body["refused"]] == [ACCT_A]
    assert "EUR and USD" in body["refused"][0]["error"] or "USD and EUR" in body["refused"][0]["error"]


def test_an_account_holding_two_currencies_raises_no_low_balance_alert(store: Store) -> None:
    """ACCT_A holds 10 EUR and 50 USD, its costs are 4.00 EUR, its threshold 20: counting its EUR
    only, the evaluation found 6.00 below 20 and raised a low-balance alert (a customer cut off
    while in credit). It is not evaluated at all: no alert, no balance state; ACCT_B, in one
    currency, is."""
    cloud = Cloud(store)
    cloud.send(ACCT_A, 4 * GB)
    cloud.send(ACCT_B, 30 * GB)
    as_the_old_race_left_it(store, (ACCT_A, "10", "EUR"), (ACCT_A, "50", "USD"), (ACCT_B, "3", "EUR"))
    book = BalanceBook(store, tariff, Thresholds(default=Decimal("20")))
    assert [x.account for x in book.evaluate(cloud.now)] == [ACCT_B]
    with store.read() as conn:
        assert [row["account"] for row in stored.states(conn)] == [ACCT_B]


def test_the_store_gauge_counts_accounts_in_two_currencies_and_an_alert_rule_reads_it(store: Store) -> None:
    """/metrics reports kvmeter_store_mixed_currency_accounts, the accounts holding credits in two
    currencies (1 here; 0 once the wrong currency's credit is reversed), which an alert rule of
    the shipped collector rules reads and the rules' promtool unit tests exercise."""
    as_the_old_race_left_it(store, (ACCT_A, "10", "EUR"), (ACCT_A, "99", "USD"), (ACCT_B, "3", "EUR"))
    metrics = Metrics()
    metrics.watch_store(store, lambda: 0)
    app = create_app(store, metrics=metrics).test_client()

    def scraped() -> str:
        found = re.search(rf"^{MIXED} (\S+)$", app.get("/metrics").get_data(as_text=True), re.M)
        return found.group(1) if found else "absent"

    assert scraped() == "1.0"
    with store.write() as conn:
        [wrong] = [c for c in stored.list_credits(conn, None, 10) if c["currency"] == "USD"]
        stored.add_credit(conn, ACCT_A, -wrong["amount"], "USD", "reversal", "ops", 2000)
    assert scraped() == "0.0"
    [rule] = [r for r in alert_rules("collector") if MIXED in r["expr"]]
    assert f"alertname: {rule['alert']}" in (RULE_TESTS / "kvmeter-collector.test.yml").read_text()


def test_an_operator_reverses_the_wrong_currency_credit_with_the_cli(store_url: str, tmp_path: Path) -> None:
    """ACCT_A holds 99 USD (credit 1) and 10 EUR (credit 2); the config's tariff is in EUR. A
    payment in EUR is taken (it was refused: "holds credits in USD"), a third currency is
    refused naming both; `kvmeter credits reverse --credit 1` adds -99 USD, once (run again it
    shows that one), a reversal or an unknown credit is not reversed; the USD value added in
    EUR, the balance counts every credit and the account holds EUR only."""
    store = Store(store_url)
    store.migrate()
    as_the_old_race_left_it(store, (ACCT_A, "99", "USD"), (ACCT_A, "10", "EUR"))
    write_tariff(tmp_path / "tariff.toml")
    config = tmp_path / "collector.toml"
    config.write_text(f'[store]\nurl = "{store_url}"\n[billing]\ntariff_file = "tariff.toml"\n')

    def run(*args: str, db: bool = False) -> tuple[int, str]:
        """A `kvmeter credits` command with the config (its tariff's EUR) or, db, without a tariff."""
        where = ["--db", store_url] if db else ["--config", str(config)]
        result = CliRunner().invoke(main, ["credits", *args, *where])
        return result.exit_code, result.output

    def credits_of_a() -> list[tuple[str, str]]:
        with store.read() as conn:
            return [(format(c["amount"], "f"), c["currency"]) for c in stored.list_credits(conn, None, 100)]

    try:
        assert run("add", "--account", ACCT_A, "--amount", "5")[0] == 0
        code, out = run("add", "--account", ACCT_A, "--amount", "1", "--currency", "GBP", db=True)
        assert (code, "holds credits in USD and EUR, not GBP" in out) == (1, True), out
        assert run("reverse", "--credit", "1") == (0, f"credit 4: -99 USD to {ACCT_A}\n")
        assert run("reverse", "--credit", "1") == (0, f"credit 4: -99 USD to {ACCT_A} (reversed before)\n")
        code, out = run("reverse", "--credit", "4")
        assert (code, "credit 4 is a reversal" in out) == (1, True), out
        code, out = run("reverse", "--credit", "999")
        assert (code, "no credit 999" in out) == (1, True), out
        assert run("add", "--account", ACCT_A, "--amount", "91.08", "--note", "credit 1's 99 USD")[0] == 0
        assert credits_of_a() == [
            ("99", "USD"),
            ("10", "EUR"),
            ("5", "EUR"),
            ("-99", "USD"),
            ("91.08", "EUR"),
        ]
        [balance] = BalanceBook(store, tariff, Thresholds()).balances(None, 0)
        assert (balance.account, balance.credits, balance.currency) == (ACCT_A, Decimal("106.08"), "EUR")
        assert store.stats(0)[MIXED.removeprefix("kvmeter_store_")] == 0
        code, out = run("add", "--account", ACCT_A, "--amount", "1", "--currency", "USD", db=True)
        assert (code, "holds credits in EUR, not USD" in out) == (1, True), out  # USD reversed: EUR alone
    finally:
        store.close()
