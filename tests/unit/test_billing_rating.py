"""Rating: tiers crossed inside a window, price changes inside a window, GB vs GiB, zero prices,
unpriced usage named, VM sizes, the one rounding rule, and the month's projection."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest

from kvmeter.collector.billing import tariff_file
from kvmeter.collector.billing.costs import month_bounds, month_costs, projected_items
from kvmeter.collector.billing.money import rounded
from kvmeter.collector.billing.rating import ADJUSTMENT, Facts, Item, Rater
from kvmeter.collector.billing.tariff import Tariff
from kvmeter.collector.model import (
    ALLOCATED_VM,
    IP_ADDRESS,
    NETWORK_BYTES_RECEIVED,
    NETWORK_BYTES_SENT,
    RUNNING_VM,
    UsageKey,
)

HOUR = 3_600_000
T0 = int(dt.datetime(2026, 3, 2, 10, tzinfo=dt.UTC).timestamp() * 1000)  # a window start
BASE = {
    "RUNNING_VM": {"usage_type": "RUNNING_VM", "per_hour": "0.02"},
    "ALLOCATED_VM": {"usage_type": "ALLOCATED_VM", "per_hour": "0"},
    "IP_ADDRESS": {"usage_type": "IP_ADDRESS", "per_hour": "0.005"},
    "NETWORK_BYTES_SENT": {
        "usage_type": "NETWORK_BYTES_SENT",
        "traffic_type": "public",
        "unit": "GB",
        "price": "0.09",
    },
    "NETWORK_BYTES_RECEIVED": {
        "usage_type": "NETWORK_BYTES_RECEIVED",
        "traffic_type": "public",
        "unit": "GB",
        "price": "0",
    },
}


def tariff(*rates: dict[str, Any], decimals: int = 6) -> Tariff:
    """BASE, with each given rate replacing BASE's rate of its usage type (the first given of
    each type replaces, later ones are added)."""
    replaced = dict(BASE)
    extra, done = [], set()
    for rate in rates:
        if rate["usage_type"] in done:
            extra.append(rate)
        else:
            replaced[rate["usage_type"]] = rate
            done.add(rate["usage_type"])
    return tariff_file.from_dict(
        {"currency": "EUR", "decimals": decimals, "rate": [*replaced.values(), *extra]}
    )


def key(
    usage_type: int,
    start: int = T0,
    *,
    resource: str = "vm-1",
    detail: str = "",
    offering: str = "",
    account: str = "acct-a",
    length: int = HOUR,
) -> UsageKey:
    if usage_type in (NETWORK_BYTES_SENT, NETWORK_BYTES_RECEIVED) and not detail:
        detail = "public"
    return UsageKey(account, usage_type, resource, offering, detail, start, start + length)


def rate_all(t: Tariff, items: list[Item], facts: Facts | None = None) -> list[Decimal]:
    return [r.cost for r in Rater(t, facts or Facts()).rate(items)]


def test_a_tier_boundary_crossed_inside_one_hourly_window() -> None:
    t = tariff(
        {
            "usage_type": "NETWORK_BYTES_SENT",
            "traffic_type": "public",
            "unit": "GB",
            "tiers": [{"up_to": 1, "price": "1.00"}, {"price": "0.50"}],
        }
    )
    first = Item(key(NETWORK_BYTES_SENT, T0), 600_000_000)
    crossing = Item(key(NETWORK_BYTES_SENT, T0 + HOUR), 600_000_000)  # 0.4 GB below, 0.2 GB above
    after = Item(key(NETWORK_BYTES_SENT, T0 + 2 * HOUR, resource="vm-2"), 1_000_000_000)  # same account
    assert rate_all(t, [first, crossing, after]) == [Decimal("0.6"), Decimal("0.5"), Decimal("0.5")]


def test_tiers_count_per_account_and_per_direction() -> None:
    t = tariff(
        {
            "usage_type": "NETWORK_BYTES_SENT",
            "traffic_type": "public",
            "unit": "GB",
            "tiers": [{"up_to": 1, "price": "1"}, {"price": "0"}],
        }
    )
    # Each account rates its own month (a Rater per account): both get the first tier.
    assert rate_all(t, [Item(key(NETWORK_BYTES_SENT), 10**9)]) == [Decimal(1)]
    assert rate_all(t, [Item(key(NETWORK_BYTES_SENT, account="acct-b"), 10**9)]) == [Decimal(1)]
    # Received bytes do not climb the sent tiers.
    rater = Rater(t)
    rater.rate([Item(key(NETWORK_BYTES_RECEIVED), 5 * 10**9)])
    assert [r.cost for r in rater.rate([Item(key(NETWORK_BYTES_SENT), 10**9)])] == [Decimal(1)]


def test_a_negative_adjustment_steps_back_down_the_tiers() -> None:
    t = tariff(
        {
            "usage_type": "NETWORK_BYTES_SENT",
            "traffic_type": "public",
            "unit": "GB",
            "tiers": [{"up_to": 1, "price": "1"}, {"price": "0.5"}],
        }
    )
    record = Item(key(NETWORK_BYTES_SENT), 2 * 10**9)
    taken_back = Item(key(NETWORK_BYTES_SENT), -(10**9) - 500_000_000, ADJUSTMENT, T0 + 3 * HOUR, 1)
    assert rate_all(t, [record, taken_back]) == [Decimal("1.5"), Decimal("-1.0")]


def test_a_price_change_inside_a_window_splits_it_at_its_instant() -> None:
    change = dt.datetime.fromtimestamp((T0 + HOUR // 4) / 1000, dt.UTC)
    t = tariff(
        {"usage_type": "IP_ADDRESS", "per_hour": "1", "until": change},
        {"usage_type": "IP_ADDRESS", "per_hour": "2", "from": change},
    )
    rated = Rater(t).rate([Item(key(IP_ADDRESS, resource="ip-1"), HOUR)])
    assert rated[0].cost == Decimal("1.75")  # a quarter hour at 1, three quarters at 2
    assert rated[0].rates == ("rate.2", "rate.5")


def test_gb_and_gib_differ() -> None:
    per_gb = tariff(
        {"usage_type": "NETWORK_BYTES_SENT", "traffic_type": "public", "unit": "GB", "price": "1"}
    )
    per_gib = tariff(
        {"usage_type": "NETWORK_BYTES_SENT", "traffic_type": "public", "unit": "GiB", "price": "1"}
    )
    one_gib = [Item(key(NETWORK_BYTES_SENT), 2**30)]
    assert rate_all(per_gib, one_gib) == [Decimal("1")]
    assert rate_all(per_gb, one_gib) == [Decimal("1.073742")]  # 1.073741824, rounded to 6 places


def test_a_zero_price_is_a_priced_zero() -> None:
    rated = Rater(tariff()).rate([Item(key(ALLOCATED_VM), HOUR), Item(key(NETWORK_BYTES_RECEIVED), 10**12)])
    assert [(r.cost, r.unpriced, r.rates) for r in rated] == [
        (Decimal(0), 0, ("rate.1",)),
        (Decimal(0), 0, ("rate.4",)),
    ]


def test_usage_no_rate_covers_is_listed_unpriced_with_its_reason() -> None:
    start, end = month_bounds(T0)
    items = [
        Item(key(NETWORK_BYTES_SENT), 10**9),
        Item(key(NETWORK_BYTES_SENT, detail="guest"), 5 * 10**9),  # guest traffic: no rate
    ]
    costs = month_costs("acct-a", items, tariff(), Facts(), T0 + HOUR, start, end)
    assert costs.cost == Decimal("0.09")
    assert not costs.complete
    [unpriced] = costs.unpriced
    assert unpriced.unpriced == 5 * 10**9
    assert unpriced.reason.startswith("no rate in force for NETWORK_BYTES_SENT of guest traffic")
    assert {line.detail: line.unpriced for line in costs.lines} == {"public": 0, "guest": 5 * 10**9}


def test_vm_time_per_vcpu_and_gib_hour_from_the_offering_then_the_vm() -> None:
    t = tariff(
        {"usage_type": "RUNNING_VM", "per_hour": "0.001", "per_vcpu_hour": "0.01", "per_gib_hour": "0.005"},
        {"usage_type": "RUNNING_VM", "offering": "big", "per_hour": "0.5"},
    )
    facts = Facts(
        vm_sizes={"vm-custom": (4, 8192)}, offering_sizes={"small": (2, 4096), "custom": (None, None)}
    )
    items = [
        Item(key(RUNNING_VM, offering="small"), HOUR),  # 0.001 + 2 * 0.01 + 4 * 0.005
        Item(
            key(RUNNING_VM, resource="vm-custom", offering="custom"), HOUR // 2
        ),  # (0.001 + 0.04 + 0.04) / 2
        Item(key(RUNNING_VM, resource="vm-2", offering="big"), HOUR),  # the offering's own rate
        Item(key(RUNNING_VM, resource="vm-3", offering="unknown"), HOUR),  # size unknown
    ]
    rated = Rater(t, facts).rate(items)
    assert [r.cost for r in rated] == [Decimal("0.041"), Decimal("0.0405"), Decimal("0.5"), Decimal(0)]
    assert rated[3].unpriced == HOUR
    assert "vm-3's size is unknown" in rated[3].reason


def test_a_zone_rate_wins_where_the_zone_is_known() -> None:
    t = tariff(
        BASE["NETWORK_BYTES_SENT"],
        {
            "usage_type": "NETWORK_BYTES_SENT",
            "traffic_type": "public",
            "unit": "GB",
            "zone": "z2",
            "price": "0.5",
        },
    )
    facts = Facts(zones={"vm-1": "z2", "vm-2": "z1"})
    items = [
        Item(key(NETWORK_BYTES_SENT), 10**9),
        Item(key(NETWORK_BYTES_SENT, resource="vm-2"), 10**9),
        Item(key(NETWORK_BYTES_SENT, resource="vm-unknown"), 10**9),
    ]
    assert rate_all(t, items, facts) == [Decimal("0.5"), Decimal("0.09"), Decimal("0.09")]


def test_the_running_total_is_rounded_so_costs_add_up_to_it() -> None:
    t = tariff({"usage_type": "IP_ADDRESS", "per_hour": "1"}, decimals=2)
    thirds = [Item(key(IP_ADDRESS, T0 + i * HOUR, resource="ip-1"), HOUR // 3) for i in range(3)]
    costs = rate_all(t, thirds)
    assert costs == [Decimal("0.33"), Decimal("0.34"), Decimal("0.33")]
    assert sum(costs) == Decimal("1.00")


@pytest.mark.parametrize(
    ("scaled", "decimals", "expected"),
    [
        (Decimal(HOUR) * Decimal("0.125"), 2, "0.12"),  # a tie goes to the even digit
        (Decimal(HOUR) * Decimal("0.135"), 2, "0.14"),
        (Decimal(HOUR) * Decimal("-0.125"), 2, "-0.12"),
        (Decimal(1), 6, "0.000000"),  # 1/3600000: below the last place
        (Decimal(HOUR) * 7, 0, "7"),
    ],
)
def test_the_rounding_rule(scaled: Decimal, decimals: int, expected: str) -> None:
    assert str(rounded(scaled, decimals)) == expected


def test_the_projection_runs_what_runs_now_and_bytes_at_the_months_rate() -> None:
    start, end = month_bounds(T0)
    now = T0 + HOUR // 2
    items = [
        Item(key(RUNNING_VM, T0 - HOUR), HOUR),
        Item(key(RUNNING_VM, T0), HOUR // 2),  # running now
        Item(key(IP_ADDRESS, T0 - HOUR, resource="ip-gone"), HOUR),  # released before this window
        Item(key(IP_ADDRESS, T0, resource="ip-stopped"), HOUR // 4),  # stopped a quarter hour ago
        Item(key(NETWORK_BYTES_SENT, start), 10**9),
    ]
    projected = projected_items(items, now, start, end)
    rest = end - now
    assert [(p.key.usage_type, p.key.resource, p.quantity) for p in projected] == [
        (RUNNING_VM, "vm-1", rest),
        (NETWORK_BYTES_SENT, "vm-1", 10**9 * rest // (now - start)),
    ]
    costs = month_costs("acct-a", items, tariff(), Facts(), now, start, end)
    vm_line = next(line for line in costs.lines if line.usage_type == RUNNING_VM)
    assert vm_line.projected - vm_line.cost == rounded(Decimal("0.02") * rest, 6)
    assert costs.projected == sum(line.projected for line in costs.lines)
    assert costs.cost == sum(line.cost for line in costs.lines) == sum(r.cost for r in costs.items)
    assert projected_items(items, end, start, end) == []  # a month over projects nothing


def test_the_projection_runs_on_in_a_new_window_no_tick_has_opened_yet() -> None:
    start, end = month_bounds(T0)
    now = T0 + HOUR + 30_000  # 30 s into the next hour: its records are not written yet
    items = [
        Item(key(RUNNING_VM, T0), HOUR),  # ran to the end of its window: runs on
        Item(key(IP_ADDRESS, T0, resource="ip-stopped"), HOUR // 2),  # released mid-window
    ]
    assert [
        (p.key.usage_type, p.key.resource, p.quantity) for p in projected_items(items, now, start, end)
    ] == [(RUNNING_VM, "vm-1", end - now)]
    # Once the tick has opened the new window, the series is projected once, not twice.
    opened = [*items, Item(key(RUNNING_VM, T0 + HOUR), 30_000)]
    assert len(projected_items(opened, now, start, end)) == 1
    # Long after the window ended with no record since, the resource is not running.
    assert projected_items(items, T0 + 2 * HOUR + HOUR // 2, start, end) == []
