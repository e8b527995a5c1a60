"""Property: an account's cost over a month equals the sum of its records' costs, and does not
depend on how its usage was split into windows (tiers, price changes at day boundaries, any
rounding precision)."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmeter.collector.billing import tariff_file
from kvmeter.collector.billing.costs import month_bounds, month_costs
from kvmeter.collector.billing.rating import Facts, Item
from kvmeter.collector.billing.tariff import Tariff
from kvmeter.collector.model import (
    IP_ADDRESS,
    NETWORK_BYTES_RECEIVED,
    NETWORK_BYTES_SENT,
    RUNNING_VM,
    UsageKey,
)

START, END = month_bounds(int(dt.datetime(2026, 3, 1, tzinfo=dt.UTC).timestamp() * 1000))
DAY = 86_400_000
WINDOWS = [60_000, 300_000, 900_000, 3_600_000, 4 * 3_600_000, DAY]  # each divides a day
prices = st.decimals(min_value=0, max_value=5, places=4).map(str)
byte_events = st.lists(
    st.tuples(
        st.integers(0, END - START - 1),
        st.sampled_from(["vm-1", "vm-2", "router"]),
        st.sampled_from([NETWORK_BYTES_SENT, NETWORK_BYTES_RECEIVED]),
        st.integers(1, 3 * 10**9),
    ),
    max_size=40,
)
spans = st.lists(
    st.tuples(
        st.sampled_from([RUNNING_VM, IP_ADDRESS]), st.integers(0, END - START - 1), st.integers(1, 5 * DAY)
    ),
    max_size=8,
)


@st.composite
def tariffs(draw: st.DrawFn) -> Tariff:
    change = START + draw(st.integers(1, 30)) * DAY
    when = dt.datetime.fromtimestamp(change / 1000, dt.UTC)
    tiers = [{"up_to": draw(st.integers(1, 20)), "price": draw(prices)}, {"price": draw(prices)}]
    rates = [
        {"usage_type": "RUNNING_VM", "per_hour": draw(prices), "per_vcpu_hour": draw(prices)},
        {"usage_type": "ALLOCATED_VM", "per_hour": "0"},
        {"usage_type": "IP_ADDRESS", "per_hour": draw(prices), "until": when},
        {"usage_type": "IP_ADDRESS", "per_hour": draw(prices), "from": when},
        {
            "usage_type": "NETWORK_BYTES_SENT",
            "traffic_type": "public",
            "unit": draw(st.sampled_from(["GB", "GiB"])),
            "tiers": tiers,
            "until": when,
        },
        {
            "usage_type": "NETWORK_BYTES_SENT",
            "traffic_type": "public",
            "unit": "GB",
            "price": draw(prices),
            "from": when,
        },
        {"usage_type": "NETWORK_BYTES_RECEIVED", "traffic_type": "public", "unit": "GiB", "tiers": tiers},
    ]
    return tariff_file.from_dict({"currency": "EUR", "decimals": draw(st.integers(0, 6)), "rate": rates})


def records(
    window: int, events: list[tuple[int, str, int, int]], spans: list[tuple[int, int, int]]
) -> list[Item]:
    """The usage as records of `window`-long windows."""
    totals: dict[UsageKey, int] = defaultdict(int)
    for offset, resource, usage_type, amount in events:
        ws = START + offset - offset % window
        totals[UsageKey("acct", usage_type, resource, "", "public", ws, ws + window)] += amount
    for usage_type, offset, length in spans:
        a, b = START + offset, min(START + offset + length, END)
        resource = "vm-1" if usage_type == RUNNING_VM else "ip-1"
        for ws in range(a - (a - START) % window, b, window):
            overlap = min(ws + window, b) - max(ws, a)
            totals[UsageKey("acct", usage_type, resource, "small", "", ws, ws + window)] += overlap
    return [Item(k, q, at_ms=k.window_start_ms) for k, q in totals.items()]


@settings(max_examples=150, deadline=None)
@given(tariffs(), byte_events, spans, st.sampled_from(WINDOWS), st.sampled_from(WINDOWS))
def test_a_months_cost_is_its_records_costs_under_any_split_of_windows(
    tariff: Tariff,
    events: list[tuple[int, str, int, int]],
    spans: list[tuple[int, int, int]],
    window_a: int,
    window_b: int,
) -> None:
    facts = Facts(offering_sizes={"small": (2, 2048)})
    now = END  # the whole month
    month_a = month_costs("acct", records(window_a, events, spans), tariff, facts, now, START, END)
    month_b = month_costs("acct", records(window_b, events, spans), tariff, facts, now, START, END)
    for month in (month_a, month_b):
        assert month.complete
        assert month.cost == sum((r.cost for r in month.items), month.cost * 0)
        assert month.cost == sum((line.cost for line in month.lines), month.cost * 0)
    assert month_a.cost == month_b.cost
