"""Low-balance alerts from the front door: `kvmeter run --all-in-one` started from a TOML file
with a tariff ([billing]) and [balances] (a threshold, a fast period, a webhook). A credit added
over the API leaves the balance below the threshold: one webhook delivery, however many
evaluations follow; a credit re-arms it; more usage crosses again: a second delivery. The
Prometheus metrics say the same."""

from __future__ import annotations

import http.server
import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmeter.collector.store import Store
from kvmeter.collector.store import credits as stored
from tests.billing_support import ACCT_A, GB, Cloud
from tests.harness.libvirt_node import CLOUDSTACK_HOST, write_node_xml
from tests.harness.ports import free_port, wait_for_port
from tests.harness.processes import KVMETER, Process

TARIFF = """
currency = "EUR"
decimals = 2
[[rate]]
usage_type = "RUNNING_VM"
per_hour = "0"
[[rate]]
usage_type = "ALLOCATED_VM"
per_hour = "0"
[[rate]]
usage_type = "IP_ADDRESS"
per_hour = "0"
[[rate]]
usage_type = "NETWORK_BYTES_SENT"
traffic_type = "public"
unit = "GB"
price = "1.00"
[[rate]]
usage_type = "NETWORK_BYTES_RECEIVED"
traffic_type = "public"
unit = "GB"
price = "0"
"""


class Hook(http.server.BaseHTTPRequestHandler):
    received: list[tuple[str, dict[str, Any]]]

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.received.append((self.headers["Idempotency-Key"], body))  # type: ignore[attr-defined]
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hook() -> Iterator[tuple[str, list[tuple[str, dict[str, Any]]]]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    server.received = []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/alerts", server.received  # type: ignore[attr-defined]
    server.shutdown()
    server.server_close()


def allinone_toml(tmp_path: Path, db: Path, sections: str, *, poll: float = 1.0) -> Path:
    """The all-in-one's file: its agent on libvirt's test driver, no metrics, its store at `db`,
    and `sections` (the collector's part under test)."""
    config = tmp_path / "allinone.toml"
    config.write_text(
        f"""
[agent]
host_id = "aio"
poll_interval = {poll}
state_dir = "{tmp_path / "agent"}"
[libvirt]
uri = "{write_node_xml(tmp_path / "node.xml", CLOUDSTACK_HOST)}"
[metrics]
enabled = false
[store]
url = "sqlite:///{db}"
{sections}"""
    )
    return config


class AllInOne(Process):
    def __init__(self, workdir: Path, config: Path):
        super().__init__("allinone", workdir)
        self.config = config

    def args(self) -> list[str]:
        return [*KVMETER, "run", "--all-in-one", "--config", str(self.config)]


def request(base: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        text = resp.read().decode()
        return resp.status, json.loads(text) if resp.headers.get("Content-Type", "").startswith(
            "application/json"
        ) else text


def eventually(check: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def metric(base: str, line: str) -> bool:
    return line in request(base, "/metrics")[1].splitlines()


@pytest.mark.libvirt
def test_one_alert_per_crossing_from_toml(tmp_path: Path, hook: tuple[str, list[Any]]) -> None:
    url, received = hook
    db = tmp_path / "usage.db"
    store = Store(f"sqlite:///{db}")
    store.migrate()
    cloud = Cloud(store)
    cloud.send(ACCT_A, 9 * GB)  # 9.00 EUR of usage so far
    (tmp_path / "tariff.toml").write_text(TARIFF)
    port = free_port()
    config = allinone_toml(
        tmp_path,
        db,
        f"""
[usage]
tick_seconds = 1
[api]
listen = "127.0.0.1:{port}"
[billing]
tariff_file = "tariff.toml"
[balances]
threshold = "5.00"
evaluate_seconds = 0.3
webhook_url = "{url}"
""",
    )
    daemon = AllInOne(tmp_path, config)
    daemon.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_port("127.0.0.1", port, 30, "kvmeter run --all-in-one")
        # Loopback and no credential yet: the caller is the operator.
        assert request(base, "/v1/credits", {"account": ACCT_A, "amount": "10.00"})[0] == 201
        eventually(lambda: len(received) == 1, f"one alert delivered\n{daemon.logs()}")
        time.sleep(2)  # several evaluations more: still below, no new alert
        assert len(received) == 1
        key, body = received[0]
        assert (body["account"], body["balance"], body["threshold"], body["currency"]) == (
            ACCT_A,
            "1.00",
            "5.00",
            "EUR",
        )
        with store.read() as conn:
            [alert] = stored.alerts(conn, None)
        assert (key, body["id"]) == (alert["idempotency_key"], alert["id"])  # the key stored with it
        assert metric(base, f'kvmeter_balance_alerts_total{{account="{ACCT_A}"}} 1.0')
        assert metric(base, f'kvmeter_balance_below_threshold{{account="{ACCT_A}"}} 1.0')
        # A credit re-arms; usage (metered all along) crosses again: a second alert.
        assert request(base, "/v1/credits", {"account": ACCT_A, "amount": "20.00"})[0] == 201
        eventually(
            lambda: metric(base, f'kvmeter_balance_below_threshold{{account="{ACCT_A}"}} 0.0'), "re-armed"
        )
        assert len(received) == 1
        cloud.send(ACCT_A, 27 * GB)  # 30.00 - 36.00 = -6.00
        eventually(lambda: len(received) == 2, f"a second alert\n{daemon.logs()}")
        assert received[1][1]["balance"] == "-6.00"
        status, balances = request(base, "/v1/balances")
        assert status == 200
        assert [(b["account"], b["balance"], b["below_threshold"]) for b in balances["balances"]] == [
            (ACCT_A, "-6.00", True)
        ]
        assert daemon.alive()
    finally:
        daemon.stop()
        store.close()
