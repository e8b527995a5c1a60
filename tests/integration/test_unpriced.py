"""Unpriced usage, on both stores: billing.unpriced finds exactly what a rating of the month
lists as unpriced (an offering the tariff does not price, time before a rate's `from`, a VM
whose size a per-vCPU rate needs is unknown, an adjustment of such usage), by usage type, and
the collector's gauges report it from the store."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from kvmeter.collector.billing import month_bounds, months_costs, tariff_file
from kvmeter.collector.billing.rating import Facts
from kvmeter.collector.billing.tariff_file import TariffSource
from kvmeter.collector.billing.unpriced import Unpriced, unpriced
from kvmeter.collector.model import ALLOCATED_VM, IP_ADDRESS, NETWORK_BYTES_SENT, RUNNING_VM, UsageKey
from kvmeter.collector.store import Store
from kvmeter.collector.unpriced_gauges import UnpricedGauges

HOUR = 3_600_000
NOW = int(dt.datetime(2026, 5, 20, 12, tzinfo=dt.UTC).timestamp() * 1000)
START, END = month_bounds(NOW)
IP_FROM = dt.datetime(2026, 5, 10, tzinfo=dt.UTC)
TARIFF: dict[str, Any] = {
    "currency": "EUR",
    "rate": [
        {"usage_type": "RUNNING_VM", "offering": "small", "per_hour": "0.02"},  # "large" unpriced
        {"usage_type": "ALLOCATED_VM", "per_vcpu_hour": "0.001"},  # the VM's size is unknown
        {"usage_type": "IP_ADDRESS", "per_hour": "0.005", "from": IP_FROM},  # none before the 10th
        {"usage_type": "NETWORK_BYTES_SENT", "traffic_type": "public", "unit": "GB", "price": "0.09"},
        {"usage_type": "NETWORK_BYTES_RECEIVED", "traffic_type": "public", "unit": "GB", "price": "0"},
    ],
}

EVERY_OFFERING = {**TARIFF, "rate": [{"usage_type": "RUNNING_VM", "per_hour": "0.02"}, *TARIFF["rate"][1:]]}


def key(account: str, usage_type: int, resource: str, offering: str, day: int, hour: int) -> UsageKey:
    start = START + (day - 1) * 24 * HOUR + hour * HOUR
    detail = "public" if usage_type == NETWORK_BYTES_SENT else ""
    return UsageKey(account, usage_type, resource, offering, detail, start, start + HOUR)


def fill(store: Store) -> None:
    rows = {}
    for day in (2, 9, 12):
        for hour in (0, 5):
            rows[key("acct-a", RUNNING_VM, "vm-1", "small", day, hour)] = HOUR
            rows[key("acct-b", RUNNING_VM, "vm-2", "large", day, hour)] = HOUR
            rows[key("acct-a", ALLOCATED_VM, "vm-1", "small", day, hour)] = HOUR
            rows[key("acct-a", IP_ADDRESS, "ip-1", "", day, hour)] = HOUR
            rows[key("acct-b", NETWORK_BYTES_SENT, "vm-2", "", day, hour)] = 10**9
    rows[key("acct-a", IP_ADDRESS, "ip-2", "", 9, 23)] = HOUR  # 23:00-24:00 on the 9th: before
    rows[key("acct-b", RUNNING_VM, "vm-2", "large", 1, 0)._replace(window_start_ms=START - HOUR)] = (
        HOUR  # April
    )
    with store.write() as conn:
        store.add_bytes(conn, rows, {}, 0, NOW)
        late = key("acct-b", RUNNING_VM, "vm-2", "large", 2, 0)
        store.add_bytes(conn, {late: 1000}, {}, late.window_end_ms, NOW)  # an adjustment, unpriced too


def from_rating(store: Store, tariff: tariff_file.Tariff) -> dict[int, Unpriced]:
    out: dict[int, Unpriced] = defaultdict(Unpriced)
    for month in months_costs(store, tariff, None, NOW, month_ms=NOW):
        for rated in month.unpriced:
            out[rated.item.key.usage_type].items += 1
            out[rated.item.key.usage_type].quantity += rated.unpriced
    return dict(out)


def test_unpriced_is_what_rating_leaves_unpriced(store: Store) -> None:
    fill(store)
    tariff = tariff_file.from_dict(TARIFF)
    with store.read() as conn:
        found = unpriced(conn, tariff, Facts(), START, END)
    assert found == from_rating(store, tariff)
    assert found == {
        RUNNING_VM: Unpriced(6 + 1, 6 * HOUR + 1000),  # the "large" offering, and its adjustment
        ALLOCATED_VM: Unpriced(6, 6 * HOUR),
        IP_ADDRESS: Unpriced(4 + 1, 5 * HOUR),
    }
    sized = Facts(vm_sizes={"vm-1": (2, 4096)})  # once its size is known, it is priced
    with store.read() as conn:
        assert ALLOCATED_VM not in unpriced(conn, tariff, sized, START, END)
    everything = tariff_file.from_dict(EVERY_OFFERING)
    with store.read() as conn:
        assert RUNNING_VM not in unpriced(conn, everything, Facts(), START, END)


def test_gauges_report_the_current_months_unpriced_usage(store: Store, tmp_path: Path) -> None:
    fill(store)
    tariffs = TariffSource(tariff_file.from_dict(TARIFF), tmp_path / "tariff.toml")
    registry = CollectorRegistry()
    registry.register(UnpricedGauges(store, tariffs, clock=lambda: NOW / 1000))
    assert registry.get_sample_value("kvmeter_unpriced_usage_items", {"usage_type": "RUNNING_VM"}) == 7
    assert (
        registry.get_sample_value("kvmeter_unpriced_usage", {"usage_type": "IP_ADDRESS", "unit": "ms"})
        == 5 * HOUR
    )
    assert (
        registry.get_sample_value("kvmeter_unpriced_usage_items", {"usage_type": "NETWORK_BYTES_SENT"})
        is None
    )
    tariffs.current = tariff_file.from_dict(EVERY_OFFERING)  # a reload: counted again at once
    assert registry.get_sample_value("kvmeter_unpriced_usage_items", {"usage_type": "RUNNING_VM"}) is None
