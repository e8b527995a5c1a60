"""The example tariff the packages install as /etc/kvmeter/tariff.toml
(packaging/config/tariff.toml.example) is a valid tariff for the collector's default billable
traffic, prices what its comments say, and the shipped collector.toml takes it once its
[billing] lines are uncommented."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from kvmeter.collector import config
from kvmeter.collector.billing import tariff_file
from kvmeter.collector.billing.rating import Facts, Item, Rater
from kvmeter.collector.model import NETWORK_BYTES_SENT, RUNNING_VM, USAGE_TYPE_NAMES, UsageKey

CONFIG = Path(__file__).resolve().parents[2] / "packaging" / "config"
EXAMPLE = CONFIG / "tariff.toml.example"
HOUR = 3_600_000


def test_the_example_tariff_loads_and_prices_every_usage_type() -> None:
    billable = config.CollectorConfig().settings.billable
    tariff = tariff_file.load(EXAMPLE, billable)
    assert (tariff.currency, tariff.decimals) == ("EUR", 6)
    assert tariff.usage_types() == frozenset(USAGE_TYPE_NAMES)
    facts = Facts(vm_sizes={"vm-1": (2, 4096)})
    vm = UsageKey("acct", RUNNING_VM, "vm-1", "", "", 0, HOUR)
    sent = UsageKey("acct", NETWORK_BYTES_SENT, "vm-1", "", "public", 0, HOUR)
    rated = Rater(tariff, facts).rate([Item(vm, HOUR), Item(sent, 1001 * 10**9)])
    assert [r.cost for r in rated] == [
        Decimal("0.0100") * 2 + Decimal("0.0050") * 4,  # 2 vCPUs, 4 GiB for an hour
        Decimal("0.09") * 1000 + Decimal("0.05"),  # the first 1000 GB, then the next tier
    ]
    assert not any(r.unpriced for r in rated)


def test_the_shipped_collector_config_takes_it(tmp_path: Path) -> None:
    text = (CONFIG / "collector.toml.example").read_text()
    enabled = text.replace(
        '# [billing]\n# tariff_file = "/etc/kvmeter/tariff.toml"', f'[billing]\ntariff_file = "{EXAMPLE}"'
    )
    assert enabled != text  # the lines the example's comment tells to uncomment
    (tmp_path / "collector.toml").write_text(enabled)
    cfg = config.load(tmp_path / "collector.toml")
    assert cfg.tariff is not None
    assert cfg.tariff == tariff_file.load(EXAMPLE, cfg.settings.billable)
