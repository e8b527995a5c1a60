"""Tariff files: the shipped example, every problem listed at once, no usage type left unpriced."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from kvmeter.collector.billing import tariff_file
from kvmeter.collector.billing.tariff_file import TariffError, TariffSource
from kvmeter.collector.model import IP_ADDRESS, NETWORK_BYTES_SENT, RUNNING_VM

EXAMPLE = Path(__file__).resolve().parents[2] / "packaging" / "config" / "tariff.toml.example"


def full(*extra: dict[str, Any], **top: Any) -> dict[str, Any]:
    """A valid tariff (every type priced, public bytes), plus extra rates."""
    rates = [
        {"usage_type": "RUNNING_VM", "per_hour": "0.02"},
        {"usage_type": "ALLOCATED_VM", "per_hour": "0"},
        {"usage_type": "IP_ADDRESS", "per_hour": "0.005"},
        {"usage_type": "NETWORK_BYTES_SENT", "traffic_type": "public", "unit": "GB", "price": "0.09"},
        {"usage_type": "NETWORK_BYTES_RECEIVED", "traffic_type": "public", "unit": "GiB", "price": "0"},
        *extra,
    ]
    return {"currency": "EUR", "rate": rates, **top}


def test_the_shipped_example_loads_with_public_traffic_billable() -> None:
    tariff = tariff_file.load(EXAMPLE, {"public"})
    assert (tariff.currency, tariff.decimals) == ("EUR", 6)
    sent = [r for r in tariff.rates if r.usage_type == NETWORK_BYTES_SENT]
    assert [(t.up_to_bytes, t.price) for t in sent[0].tiers] == [
        (1000 * 10**9, Decimal("0.09")),
        (None, Decimal("0.05")),
    ]
    vm = next(r for r in tariff.rates if r.usage_type == RUNNING_VM)
    assert (vm.per_vcpu_hour, vm.per_gib_hour) == (Decimal("0.0100"), Decimal("0.0050"))


def test_units_are_explicit_and_gb_is_not_gib() -> None:
    tariff = tariff_file.from_dict(full())
    units = {r.unit: r.unit_bytes for r in tariff.rates if r.unit}
    assert units == {"GB": 10**9, "GiB": 2**30}


def test_every_problem_is_listed_at_once() -> None:
    doc = full(
        {"usage_type": "IP_ADDRESS", "per_hour": 0.005},  # a float: binary, refused
        {"usage_type": "NETWORK_BYTES_SENT", "unit": "GB", "price": "1"},  # no traffic type
        {"usage_type": "NETWORK_BYTES_SENT", "traffic_type": "guest", "price": "1"},  # no unit
        {
            "usage_type": "NETWORK_BYTES_SENT",
            "traffic_type": "storage",
            "unit": "GB",
            "price": "1",
            "tiers": [{"price": "1"}],
        },  # both
        {
            "usage_type": "NETWORK_BYTES_RECEIVED",
            "traffic_type": "guest",
            "unit": "GB",
            "tiers": [{"up_to": 5, "price": "1"}, {"up_to": 2, "price": "1"}, {"price": "0"}],
        },  # not up
        {"usage_type": "RUNNING_VM", "offering": "o1", "per_hour": "-1"},
        {"usage_type": "IP_ADDRESS", "per_hour": "1", "from": dt.datetime(2026, 1, 1)},  # naive
        {"usage_type": "RUNNING_VM", "per_hour": "0.03"},  # overlaps the first RUNNING_VM rate
        {"usage_type": "IP_ADDRESS", "per_vcpu_hour": "1"},
        {"usage_type": "BOGUS", "per_hour": "1"},
        {
            "usage_type": "ALLOCATED_VM",
            "per_hour": "1",
            "colour": "red",
            "from": dt.datetime(2026, 2, 1, tzinfo=dt.UTC),
            "until": dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        },
        currency="euro",
        decimals=13,
    )
    with pytest.raises(TariffError) as err:
        tariff_file.from_dict(doc, "tariff.toml")
    problems = err.value.problems
    text = "\n".join(problems)
    for expected in (
        "currency:",
        "decimals:",
        'rate.5.per_hour: a price is a string or an integer, not float (write "0.005")',
        "rate.6: NETWORK_BYTES_SENT needs traffic_type",
        "rate.7: NETWORK_BYTES_SENT needs unit",
        "rate.8: NETWORK_BYTES_SENT needs exactly one of price or tiers",
        "rate.9.tiers.1.up_to: tiers must go up",
        "rate.10.per_hour: '-1' must be a finite number >= 0",
        "rate.11.from: a TOML date-time with an offset",
        "rate.12: in force at the same time as rate.0",
        "rate.13.per_vcpu_hour: only VM time has it",
        "rate.14.usage_type:",
        "rate.15.colour: unknown key",
        "rate.15: from (2026-02-01",
    ):
        assert expected in text, expected
    assert str(err.value).startswith("tariff.toml: ")


@pytest.mark.parametrize("missing", ["ALLOCATED_VM", "NETWORK_BYTES_RECEIVED"])
def test_a_usage_type_without_a_rate_is_an_error_not_a_silent_zero(missing: str) -> None:
    doc = full()
    doc["rate"] = [r for r in doc["rate"] if r["usage_type"] != missing]
    with pytest.raises(TariffError) as err:
        tariff_file.from_dict(doc)
    assert err.value.problems == [f'no rate for {missing}: add one (price "0" if it is free)']


def test_every_billable_traffic_type_needs_a_rate_in_every_zone() -> None:
    zoned = {
        "usage_type": "NETWORK_BYTES_SENT",
        "traffic_type": "guest",
        "zone": "z1",
        "unit": "GB",
        "price": "1",
    }
    with pytest.raises(TariffError) as err:
        tariff_file.from_dict(full(zoned), billable={"public", "guest"})
    assert err.value.problems == [
        "no rate for NETWORK_BYTES_SENT of billable traffic 'guest' in every zone",
        "no rate for NETWORK_BYTES_RECEIVED of billable traffic 'guest' in every zone",
    ]


def test_a_price_change_is_two_rates_meeting_at_an_instant() -> None:
    change = dt.datetime(2026, 3, 1, 12, 30, tzinfo=dt.UTC)
    doc = full()
    doc["rate"][2] = {"usage_type": "IP_ADDRESS", "per_hour": "1", "until": change}
    doc["rate"].append({"usage_type": "IP_ADDRESS", "per_hour": "2", "from": change})
    tariff = tariff_file.from_dict(doc)
    at = int(change.timestamp() * 1000)
    pieces = tariff.periods(IP_ADDRESS, "", "", "", at - 1000, at + 1000)
    assert [(a, b, r.per_hour if r else None) for a, b, r in pieces] == [
        (at - 1000, at, Decimal(1)),
        (at, at + 1000, Decimal(2)),
    ]


def test_a_reload_keeps_the_tariff_in_force_when_the_new_file_is_bad(tmp_path: Path) -> None:
    path = tmp_path / "tariff.toml"
    path.write_text(EXAMPLE.read_text())
    source = TariffSource(tariff_file.load(path), path, {"public"})
    before = source.current
    path.write_text(EXAMPLE.read_text().replace('per_hour = "0.0050"', "per_hour = 0.005"))
    with pytest.raises(TariffError, match="not float"):
        source.reload()
    assert source.current is before
    path.write_text(EXAMPLE.read_text().replace('currency = "EUR"', 'currency = "USD"'))
    assert source.reload().startswith("USD, 5 rate(s) from ")
    assert source.current.currency == "USD"


def test_a_missing_or_broken_file_is_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(TariffError, match="cannot read"):
        tariff_file.load(tmp_path / "none.toml")
    (tmp_path / "bad.toml").write_text("currency = ")
    with pytest.raises(TariffError, match="not valid TOML"):
        tariff_file.load(tmp_path / "bad.toml")


def test_the_collector_config_names_the_tariff_and_lists_its_problems_with_its_own(tmp_path: Path) -> None:
    from kvmeter.collector import config

    (tmp_path / "tariff.toml").write_text(EXAMPLE.read_text())
    cfg = config.from_dict({"billing": {"tariff_file": "tariff.toml"}}, "collector.toml", base=tmp_path)
    assert cfg.tariff is not None
    assert (cfg.tariff.currency, cfg.tariff_file) == ("EUR", tmp_path / "tariff.toml")
    assert config.CollectorConfig().tariff is None  # no [billing]: no costs
    doc = {
        "billing": {"tariff_file": "tariff.toml", "colour": 1},
        "usage": {"billable_traffic_types": ["public", "guest"]},  # guest bytes have no rate
    }
    with pytest.raises(config.ConfigError) as err:
        config.from_dict(doc, "collector.toml", base=tmp_path)
    assert err.value.problems[0].startswith("billing.colour: unknown key")
    assert f"billing.tariff_file: {tmp_path / 'tariff.toml'}: no rate for NETWORK_BYTES_SENT of billable" in (
        "\n".join(err.value.problems)
    )
