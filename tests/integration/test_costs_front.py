"""Costs through the front door: `kvmeter ingest` fills a store, `kvmeter collector --config`
(a TOML file naming a tariff file) serves /v1/costs over it; SIGHUP puts a new tariff in force
and refuses a broken one; a bad tariff stops the collector at start with every problem listed;
`kvmeter costs` rates the same store the same way."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from pathlib import Path
from typing import Any

import pytest

from tests.collector_support import ACCT_A, ACCT_B, HOUR, IP1, VM1, VM2, usage_event, wait_for
from tests.harness.collector_command import CollectorCommand
from tests.harness.ports import free_port, wait_for_port

TOKEN = "operator-token-0123456789"
PRICES = {1: Decimal("0.02"), 2: Decimal("0.001"), 3: Decimal("0.005")}  # per hour, by usage type
TARIFF = """
currency = "{currency}"
decimals = 6
[[rate]]
usage_type = "RUNNING_VM"
per_hour = "{running}"
[[rate]]
usage_type = "ALLOCATED_VM"
per_hour = "0.001"
[[rate]]
usage_type = "IP_ADDRESS"
per_hour = "0.005"
[[rate]]
usage_type = "NETWORK_BYTES_SENT"
traffic_type = "public"
unit = "GB"
tiers = [{{ up_to = 1000, price = "0.09" }}, {{ price = "0.05" }}]
[[rate]]
usage_type = "NETWORK_BYTES_RECEIVED"
traffic_type = "public"
unit = "GiB"
price = "0"
"""


def write_tariff(path: Path, currency: str = "EUR", running: str = "0.02") -> None:
    path.write_text(TARIFF.format(currency=currency, running=running))


def get(port: int, path: str, **params: str) -> tuple[int, Any]:
    url = f"http://127.0.0.1:{port}{path}?" + urllib.parse.urlencode(params)
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        body = json.loads(err.read())
        err.close()
        return err.code, body


@pytest.fixture
def store_with_usage(tmp_path: Path) -> str:
    """A store `kvmeter ingest` filled with this month's VMs and an IP address."""
    now = int(time.time() * 1000)
    start = now - now % HOUR - 2 * HOUR
    events = [
        usage_event("VM.CREATE", VM1, ACCT_A, start),
        usage_event("VM.START", VM1, ACCT_A, start),
        usage_event("NET.IPASSIGN", IP1, ACCT_A, start + HOUR // 4),
        usage_event("VM.CREATE", VM2, ACCT_B, start + HOUR),
        usage_event("VM.START", VM2, ACCT_B, start + HOUR),
    ]
    (tmp_path / "events.jsonl").write_bytes(b"\n".join(v for _, v in events) + b"\n")
    url = f"sqlite:///{tmp_path}/usage.db"
    subprocess.run(
        [sys.executable, "-m", "kvmeter", "ingest", "--db", url, "--events", str(tmp_path / "events.jsonl")],
        check=True,
        capture_output=True,
    )
    return url


class Collector(CollectorCommand):
    def __init__(self, tmp_path: Path, url: str, tariff_file: str = "tariff.toml"):
        self.port = free_port()
        self.config = tmp_path / "collector.toml"
        self.config.write_text(
            f"""
[store]
url = "{url}"
[webhook]
secret_key = "webhook-secret"
[usage]
tick_seconds = 3600
[api]
listen = "127.0.0.1:{self.port}"
token = "{TOKEN}"
[billing]
tariff_file = "{tariff_file}"
"""
        )
        super().__init__(self.config, tmp_path / "collector.log")


@pytest.fixture
def started() -> Iterator[list[Collector]]:
    running: list[Collector] = []
    yield running
    for c in running:
        c.stop()


def expected_cost(port: int, account: str, month: dict[str, Any], running: Decimal) -> Decimal:
    """The month's records from /v1/usage, priced by hand: quantity (ms) * price per hour,
    the exact total rounded half-even to 6 places."""
    status, body = get(port, "/v1/usage", start=month["start"], end=month["end"], account=account)
    assert status == 200
    prices = {**PRICES, 1: running}
    with localcontext() as ctx:
        ctx.prec = 60
        total = sum((prices[r["usage_type"]] * r["quantity"] / 3_600_000 for r in body["usage"]), Decimal(0))
    assert body["usage"]
    return total.quantize(Decimal("0.000001"), rounding=ROUND_HALF_EVEN)


def test_the_collector_serves_costs_under_its_tariff_file_and_reloads_it_on_sighup(
    tmp_path: Path, store_with_usage: str, started: list[Collector]
) -> None:
    write_tariff(tmp_path / "tariff.toml")
    started.append(c := Collector(tmp_path, store_with_usage))
    wait_for_port("127.0.0.1", c.port, 30, c.log())

    def costs() -> dict[str, Any]:
        status, body = get(c.port, "/v1/costs")
        assert status == 200, body
        return body

    # The first tick brings the records up to now; costs follow them.
    wait_for(lambda: len(costs()["accounts"]) == 2, 30, "costs of both accounts", c.log)
    body = costs()
    assert body["currency"] == "EUR"
    by_account = {a["account"]: a for a in body["accounts"]}
    for account in (ACCT_A, ACCT_B):
        month = by_account[account]
        assert Decimal(month["cost"]) == expected_cost(c.port, account, body, Decimal("0.02"))
        assert Decimal(month["projected"]) > Decimal(month["cost"])  # its VM runs on
        assert month["complete"]

    # SIGHUP: a new tariff is in force for the next request.
    write_tariff(tmp_path / "tariff.toml", "USD", running="0.04")
    c.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: costs()["currency"] == "USD", 30, "the new tariff", c.log)
    body = costs()
    a = next(m for m in body["accounts"] if m["account"] == ACCT_A)
    assert Decimal(a["cost"]) == expected_cost(c.port, ACCT_A, body, Decimal("0.04"))

    # A broken one is refused: the log says why, the tariff in force stays.
    (tmp_path / "tariff.toml").write_text(
        'currency = "USD"\n[[rate]]\nusage_type = "IP_ADDRESS"\nper_hour = 0.1\n'
    )
    c.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload of tariff refused" in c.log(), 30, "the refusal", c.log)
    assert "rate.0.per_hour: a price is a string or an integer, not float" in c.log()
    assert costs()["currency"] == "USD"
    assert c.proc.poll() is None

    # `kvmeter costs` rates the same store under the same tariff file (compared while the
    # records stand still: the collector's tick may move the current window between reads).
    write_tariff(tmp_path / "tariff.toml", "USD", running="0.04")
    command = [sys.executable, "-m", "kvmeter", "costs", "--config", str(c.config), "--format", "json"]

    def same_from_cli() -> bool:
        before = [m["cost"] for m in costs()["accounts"]]
        cli = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        assert cli["currency"] == "USD"
        return before == [m["cost"] for m in cli["accounts"]] == [m["cost"] for m in costs()["accounts"]]

    wait_for(same_from_cli, 60, "kvmeter costs to agree with /v1/costs", c.log)


def test_a_bad_tariff_file_stops_the_collector_with_every_problem(
    tmp_path: Path, store_with_usage: str, started: list[Collector]
) -> None:
    (tmp_path / "tariff.toml").write_text(
        'currency = "EUR"\n[[rate]]\nusage_type = "RUNNING_VM"\nper_hour = 0.02\n'
    )
    started.append(c := Collector(tmp_path, store_with_usage))
    assert c.proc.wait(30) != 0
    log = c.log()
    assert "billing.tariff_file:" in log
    assert "rate.0.per_hour: a price is a string or an integer, not float" in log
    for missing in ("ALLOCATED_VM", "IP_ADDRESS", "NETWORK_BYTES_SENT", "NETWORK_BYTES_RECEIVED"):
        assert f"no rate for {missing}" in log
    assert "API on" not in log
