"""The tariff's currency against the credits already held: a SIGHUP or a restart that would put
a tariff in another currency in force is refused with both currencies named (the tariff in force
stays, the balances are still answered in it), and `kvmeter credits add --db` without a tariff
(and POST /v1/credits on an API that rates no tariff) refuses an account's first credit in a
currency other than the store's credits', on both stores."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from kvmeter.cli import main
from kvmeter.collector.store import Store
from kvmeter.collector.store import credits as stored
from tests.billing_support import ACCT_A, ACCT_B
from tests.collector_support import wait_for
from tests.harness.collector_command import CollectorCommand
from tests.harness.ports import free_port, wait_for_port
from tests.integration.test_costs_front import TOKEN, get, write_tariff
from tests.integration.test_credits_api import OPERATOR, call, client


class Collector(CollectorCommand):
    """`kvmeter collector` from a TOML file naming tariff.toml, its API on a free port."""

    def __init__(self, tmp_path: Path, url: str, log: str = "collector.log"):
        self.port = free_port()
        config = tmp_path / "collector.toml"
        config.write_text(
            f'[store]\nurl = "{url}"\n[webhook]\nsecret_key = "webhook-secret"\n[usage]\n'
            f'tick_seconds = 3600\n[api]\nlisten = "127.0.0.1:{self.port}"\ntoken = "{TOKEN}"\n'
            '[billing]\ntariff_file = "tariff.toml"\n'
        )
        super().__init__(config, tmp_path / log)


@pytest.fixture
def started() -> Iterator[list[Collector]]:
    running: list[Collector] = []
    yield running
    for c in running:
        c.stop()


def credits_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["credits", *args])
    return result.exit_code, result.output


def test_a_sighup_to_a_tariff_in_another_currency_is_refused_while_credits_are_held(
    tmp_path: Path, store_url: str, started: list[Collector]
) -> None:
    """The collector rates in EUR; ACCT_A holds 25 EUR (`kvmeter credits add --config`). The
    tariff file is changed to USD and SIGHUP sent: the reload is refused, the log naming USD and
    the EUR the credits are in; GET /v1/balances still answers ACCT_A's balance in EUR (none
    refused) and a credit still goes in, in EUR."""
    write_tariff(tmp_path / "tariff.toml", "EUR")
    started.append(c := Collector(tmp_path, store_url))
    code, out = credits_cli("add", "--config", str(c.config), "--account", ACCT_A, "--amount", "25")
    assert code == 0, out
    wait_for_port("127.0.0.1", c.port, 30, c.log())

    write_tariff(tmp_path / "tariff.toml", "USD")
    c.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload of tariff" in c.log() or "reloaded tariff" in c.log(), 30, "the reload", c.log)
    log = c.log()
    assert "reload of tariff refused" in log, log
    assert "currency USD: the store's credits are in EUR" in log, log
    assert f"EUR (1 account(s), e.g. {ACCT_A})" in log, log
    assert c.proc.poll() is None, log
    status, body = get(c.port, "/v1/balances")
    assert status == 200, body
    assert [(b["account"], b["currency"], b["credits"]) for b in body["balances"]] == [(ACCT_A, "EUR", "25")]
    assert body["refused"] == []


def eur_credits_and_a_usd_tariff(tmp_path: Path, store_url: str) -> None:
    """ACCT_A holds 25 EUR in the store; tariff.toml says USD."""
    write_tariff(tmp_path / "tariff.toml", "USD")
    store = Store(store_url)
    store.migrate()
    try:
        with store.write() as conn:
            stored.add_credit(conn, ACCT_A, Decimal("25"), "EUR", "", "ops", 1000)
    finally:
        store.close()


def test_a_start_with_a_tariff_in_another_currency_than_the_credits_is_refused(
    tmp_path: Path, store_url: str, started: list[Collector]
) -> None:
    """ACCT_A holds 25 EUR, the tariff file says USD: `kvmeter collector` exits 1 before its
    API, naming both currencies, as with a tariff file that does not load."""
    eur_credits_and_a_usd_tariff(tmp_path, store_url)
    started.append(c := Collector(tmp_path, store_url))
    assert c.proc.wait(30) == 1
    log = c.log()
    assert "billing.tariff_file:" in log, log
    assert "currency USD: the store's credits are in EUR" in log, log
    assert "API on" not in log


def test_an_all_in_one_start_with_a_tariff_in_another_currency_than_the_credits_is_refused(
    tmp_path: Path, store_url: str
) -> None:
    """ACCT_A holds 25 EUR, the tariff file says USD: `kvmeter run --all-in-one` exits 2 naming
    both currencies, as with a tariff file that does not load (its convention for the config)."""
    eur_credits_and_a_usd_tariff(tmp_path, store_url)
    config = tmp_path / "allinone.toml"
    config.write_text(
        f'[store]\nurl = "{store_url}"\n[agent]\nstate_dir = "{tmp_path}/agent"\n'
        '[api]\nenabled = false\n[billing]\ntariff_file = "tariff.toml"\n'
    )
    run = [sys.executable, "-m", "kvmeter", "run", "--all-in-one", "--config", str(config)]
    try:
        done = subprocess.run(run, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the all-in-one started: {exc.stderr!r}")
    assert done.returncode == 2, done.stderr
    assert f"invalid config {config}: " in done.stderr, done.stderr
    assert "billing.tariff_file: " in done.stderr, done.stderr
    assert "currency USD: the store's credits are in EUR" in done.stderr, done.stderr


def test_a_credit_added_without_a_tariff_takes_the_currency_of_the_credits_held(store_url: str) -> None:
    """ACCT_A holds 25 EUR. `kvmeter credits add --db URL --currency USD` (no config, no tariff)
    for ACCT_B, a new account, is refused naming EUR: the collector's tariff is EUR, and a USD
    credit would count in no balance. In EUR it is added; in a store with no credit, any currency
    is taken."""
    code, out = credits_cli(
        "add", "--db", store_url, "--account", ACCT_A, "--amount", "25", "--currency", "EUR"
    )
    assert code == 0, out
    code, out = credits_cli(
        "add", "--db", store_url, "--account", ACCT_B, "--amount", "5", "--currency", "USD"
    )
    assert code == 1, out
    assert f"the store's credits are in EUR (1 account(s), e.g. {ACCT_A}), not USD" in out
    code, out = credits_cli(
        "add", "--db", store_url, "--account", ACCT_B, "--amount", "5", "--currency", "EUR"
    )
    assert (code, out) == (0, f"credit 2: 5 EUR to {ACCT_B}\n")


def test_an_accounts_first_credit_posted_without_a_tariff_takes_the_currency_of_the_credits_held(
    store: Store,
) -> None:
    """POST /v1/credits on an API that rates no tariff: ACCT_A's first credit names EUR; ACCT_B's
    first, in USD, is a 409 naming EUR (never a 5xx), nothing added; in EUR it is a 201."""
    app = client(store, None)

    def post(account: str, currency: str) -> tuple[int, Any]:
        body = {"account": account, "amount": "5", "currency": currency}
        return call(app, "POST", "/v1/credits", OPERATOR, json=body)

    assert post(ACCT_A, "EUR")[0] == 201
    status, body = post(ACCT_B, "USD")
    assert status == 409, body
    assert "the store's credits are in EUR" in body["error"]
    assert post(ACCT_B, "EUR")[0] == 201
    with store.read() as conn:
        assert [c["currency"] for c in stored.list_credits(conn, None, 10)] == ["EUR", "EUR"]


def test_a_first_credit_added_with_a_config_whose_tariff_is_not_the_credits_currency_is_refused(
    tmp_path: Path, store_url: str
) -> None:
    """ACCT_A holds 25 EUR (the collector rates in EUR); the tariff file has just been changed to
    USD (the collector refused that SIGHUP and still rates in EUR). `kvmeter credits add --config`
    for ACCT_B, a new account, takes its currency from that file: it is refused (exit 1) naming
    the EUR the store's credits are in, as without a tariff, and nothing is added. Added, ACCT_B
    would have no balance under the EUR tariff in force, and neither tariff would start again."""
    eur_credits_and_a_usd_tariff(tmp_path, store_url)
    config = tmp_path / "collector.toml"
    config.write_text(f'[store]\nurl = "{store_url}"\n[billing]\ntariff_file = "tariff.toml"\n')
    result = CliRunner().invoke(
        main, ["credits", "add", "--config", str(config), "--account", ACCT_B, "--amount", "5"]
    )
    assert result.exit_code == 1, result.output
    assert f"the store's credits are in EUR (1 account(s), e.g. {ACCT_A}), not USD" in result.output
    store = Store(store_url)
    try:
        with store.read() as conn:
            assert [c["currency"] for c in stored.list_credits(conn, None, 10)] == ["EUR"]
    finally:
        store.close()
