"""Costs of billable items through the front door: a real `kvmeter collector` from a TOML file
with [billing] (a tariff with a tier crossed inside a window and prices that round) and
[handoff] POSTing to a local receiver, fed by a real broker: records finalized, late bytes and a
late stop as adjustments. Once every window is final, the receiver's items (deduplicated by
transaction id) add up to the account's cost on /v1/costs, to the last digit."""

from __future__ import annotations

import datetime as dt
import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.collector_support import ACCT_A, M, Stream, usage_event, wait_for
from tests.collector_support import VM1 as VM
from tests.handoff_support import Receiver
from tests.harness.kafka import FAST_GROUP_TOML
from tests.harness.ports import free_port, wait_for_port
from tests.integration.test_consume_live import produce
from tests.integration.test_handoff_front import final_net, outbox

pytestmark = pytest.mark.broker
WINDOW_MS = 2000
TOKEN = "operator-token-0123456789"
TARIFF = """
currency = "EUR"
decimals = 4
[[rate]]
usage_type = "RUNNING_VM"
per_hour = "0.37"
[[rate]]
usage_type = "ALLOCATED_VM"
per_hour = "0.013"
[[rate]]
usage_type = "IP_ADDRESS"
per_hour = "0.005"
[[rate]]
usage_type = "NETWORK_BYTES_SENT"
traffic_type = "public"
unit = "B"
tiers = [{ up_to = 1500, price = "0.0003" }, { price = "0.0001" }]
[[rate]]
usage_type = "NETWORK_BYTES_RECEIVED"
traffic_type = "public"
unit = "kB"
price = "0.0011"
"""


@pytest.fixture
def db_url(pg_database: str) -> str:
    """PostgreSQL, the replicas' store, only: the items' pricing is the same code on either store
    (test_item_costs and test_money_edges run it on both), and this front door costs half a
    minute a store."""
    return pg_database


def costs(port: int, account: str, month: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/v1/costs?account={account}&month={month}"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        body: dict[str, Any] = json.loads(resp.read())
    return body


@pytest.mark.pg
def test_items_amounts_sum_to_the_accounts_cost_on_v1_costs(
    kafka_bootstrap: str, unique_topic: Callable[..., str], tmp_path: Path, db_url: str
) -> None:
    measures, lifecycle = unique_topic("measures"), unique_topic("cloudstack")
    base = (int(time.time() * 1000) // WINDOW_MS - 12) * WINDOW_MS  # 24 s ago: windows to finalize
    month = dt.datetime.fromtimestamp(base / 1000, dt.UTC).strftime("%Y-%m")
    produce(
        kafka_bootstrap,
        lifecycle,
        [usage_event("VM.CREATE", VM, ACCT_A, base), usage_event("VM.START", VM, ACCT_A, base)],
    )
    stream = Stream("stream-h1", "h1")
    produce(
        kafka_bootstrap,
        measures,
        [(b"h1", stream.batch([M(base + i * 1000, base + i * 1000 + 900, 300 + i)])) for i in range(12)],
    )
    (tmp_path / "tariff.toml").write_text(TARIFF)
    port = free_port()
    with Receiver() as receiver:
        config = tmp_path / "collector.toml"
        config.write_text(
            f"""
[store]
url = "{db_url}"
[kafka]
bootstrap = "{kafka_bootstrap}"
measures_topic = "{measures}"
lifecycle_topic = "{lifecycle}"
group = "g-{measures}"
{FAST_GROUP_TOML}[usage]
window_seconds = 2
grace_seconds = 0
tick_seconds = 0.2
[api]
listen = "127.0.0.1:{port}"
token = "{TOKEN}"
[billing]
tariff_file = "tariff.toml"
[handoff]
webhook_url = "{receiver.url}"
timeout_seconds = 5
retry_initial_seconds = 0.05
retry_max_seconds = 0.2
lease_seconds = 6
poll_seconds = 0.2
"""
        )
        log_path = tmp_path / "collector.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "kvmeter", "collector", "--config", str(config)],
                stdout=log,
                stderr=log,
            )

        def logs() -> str:
            return log_path.read_text(errors="replace")[-4000:]

        try:
            wait_for_port("127.0.0.1", port, 60, "the API")

            def bytes_posted() -> int:
                items = receiver.deduplicated().values()
                return sum(i["quantity"] for i in items if i["usage_type_name"] == "NETWORK_BYTES_SENT")

            first = sum(300 + i for i in range(12))
            wait_for(lambda: bytes_posted() == first, 90, "the bytes posted", logs)
            # Late bytes to windows already final (adjustments), then the VM stops and goes.
            late = Stream("stream-late", "h2")
            produce(
                kafka_bootstrap,
                measures,
                [
                    (b"h2", late.batch([M(base + i * 1000, base + i * 1000 + 500, 1000 + i)]))
                    for i in (1, 3, 4)
                ],
            )
            end = (int(time.time() * 1000) // WINDOW_MS) * WINDOW_MS
            produce(
                kafka_bootstrap,
                lifecycle,
                [usage_event("VM.STOP", VM, ACCT_A, end - 3000), usage_event("VM.DESTROY", VM, ACCT_A, end)],
            )
            wait_for(
                lambda: final_net(db_url)[1] and time.time() * 1000 > end + 2 * WINDOW_MS,
                90,
                "all final",
                logs,
            )
            then = first + sum(1000 + i for i in (1, 3, 4))
            wait_for(lambda: bytes_posted() == then, 90, "the late bytes posted", logs)
            wait_for(lambda: outbox(db_url)[0] and outbox(db_url)[1] == 0, 90, "the outbox drained", logs)
            body = costs(port, ACCT_A, month)
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(30)
        assert code == 0, logs()

        items = receiver.deduplicated()
        assert set(items) == outbox(db_url)[0]
        kinds = {(i["kind"], i["usage_type_name"]) for i in items.values()}
        assert ("adjustment", "NETWORK_BYTES_SENT") in kinds, kinds  # the late bytes
        assert ("adjustment", "RUNNING_VM") in kinds, kinds  # the late stop
        assert {i["cost"]["currency"] for i in items.values()} == {"EUR"}
        (account,) = body["accounts"]
        assert account["complete"]
        total = sum((Decimal(i["cost"]["amount"]) for i in items.values()), Decimal(0))
        assert total == Decimal(account["cost"]) > 0
