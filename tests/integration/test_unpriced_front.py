"""Unpriced usage through the front door: `kvmeter collector --config` whose tariff file prices
RUNNING_VM for one offering only reports the running VMs' time as unpriced on /metrics and in
/v1/costs; a fixed tariff put in force by SIGHUP clears both."""

from __future__ import annotations

import signal
import urllib.request
from decimal import Decimal
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.collector_support import wait_for
from tests.harness.ports import wait_for_port
from tests.integration.test_costs_front import TOKEN, Collector, get, started, store_with_usage, write_tariff

__all__ = ["started", "store_with_usage"]  # fixtures shared with test_costs_front


def unpriced_items(port: int) -> dict[str, float]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        text = resp.read().decode()
    return {
        s.labels["usage_type"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "kvmeter_unpriced_usage_items"
    }


def test_unpriced_usage_on_metrics_and_in_costs_until_the_tariff_prices_it(
    tmp_path: Path, store_with_usage: str, started: list[Collector]
) -> None:
    write_tariff(tmp_path / "tariff.toml")
    full = (tmp_path / "tariff.toml").read_text()
    # RUNNING_VM for the "gpu" offering only: the test's VMs run on none.
    (tmp_path / "tariff.toml").write_text(
        full.replace('usage_type = "RUNNING_VM"\n', 'usage_type = "RUNNING_VM"\noffering = "gpu"\n', 1)
    )
    started.append(c := Collector(tmp_path, store_with_usage))
    wait_for_port("127.0.0.1", c.port, 30, c.log())
    wait_for(lambda: unpriced_items(c.port).get("RUNNING_VM", 0) >= 2, 30, "unpriced RUNNING_VM", c.log)
    assert set(unpriced_items(c.port)) == {"RUNNING_VM"}
    status, body = get(c.port, "/v1/costs")
    assert status == 200
    for month in body["accounts"]:
        assert not month["complete"]
        assert {u["usage_type_name"] for u in month["unpriced"]} == {"RUNNING_VM"}
        assert all("no rate in force for RUNNING_VM" in u["reason"] for u in month["unpriced"])
        assert Decimal(month["cost"]) > 0  # what is priced still is
    (tmp_path / "tariff.toml").write_text(full)
    c.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: unpriced_items(c.port) == {}, 30, "no unpriced usage", c.log)
    status, body = get(c.port, "/v1/costs")
    assert all(month["complete"] for month in body["accounts"])
