"""The rating memo: a month rated again after any change (a grown record, a new window, a late
record, an adjustment, a record gone, a new tariff or facts) costs exactly what rating it from
scratch costs, item by item, and the part before the change is not rated again."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmeter.collector.billing import RatingMemo, tariff_file
from kvmeter.collector.billing.costs import MonthCosts, month_bounds, month_costs
from kvmeter.collector.billing.rating import ADJUSTMENT, RECORD, Facts, Item
from kvmeter.collector.model import IP_ADDRESS, NETWORK_BYTES_SENT, RUNNING_VM, UsageKey

START, END = month_bounds(int(dt.datetime(2026, 3, 1, tzinfo=dt.UTC).timestamp() * 1000))
HOUR = 3_600_000
NOW = START + 20 * 24 * HOUR + HOUR // 2


def tariff(decimals: int = 2, price: str = "0.07") -> tariff_file.Tariff:
    change = dt.datetime(2026, 3, 10, 12, 30, tzinfo=dt.UTC)  # inside a window
    return tariff_file.from_dict(
        {
            "currency": "EUR",
            "decimals": decimals,
            "rate": [
                {"usage_type": "RUNNING_VM", "per_hour": "0.013", "until": change},
                {"usage_type": "RUNNING_VM", "per_hour": price, "from": change},
                {"usage_type": "ALLOCATED_VM", "per_hour": "0"},
                {"usage_type": "IP_ADDRESS", "per_hour": "0.0049"},
                {"usage_type": "NETWORK_BYTES_SENT", "traffic_type": "public", "unit": "GB",
                 "tiers": [{"up_to": 3, "price": "0.09"}, {"up_to": 9, "price": "0.05"},
                           {"up_to": 20, "price": "0.03"}, {"price": "0.01"}]},
                {"usage_type": "NETWORK_BYTES_RECEIVED", "traffic_type": "public", "unit": "GiB",
                 "price": "0"},
            ],
        }
    )  # fmt: skip


def record(hour: int, usage_type: int, resource: str, quantity: int) -> Item:
    start = START + hour * HOUR
    detail = "public" if usage_type == NETWORK_BYTES_SENT else ""
    key = UsageKey("acct", usage_type, resource, "", detail, start, start + HOUR)
    return Item(key, quantity, RECORD, start)


kinds = st.sampled_from([RUNNING_VM, IP_ADDRESS, NETWORK_BYTES_SENT])
quantities = st.integers(1, 900_000_000)
items = st.lists(
    st.builds(record, st.integers(0, 24 * 30 - 1), kinds, st.sampled_from(["vm-1", "vm-2"]), quantities),
    max_size=60,
    unique_by=lambda i: i.key,
)
edits = st.lists(
    st.tuples(
        st.sampled_from(["grow", "add", "adjust", "drop", "change"]), st.integers(0, 10**6), quantities
    ),
    min_size=1,
    max_size=6,
)


def edited(month: list[Item], edit: tuple[str, int, int]) -> list[Item]:
    what, where, quantity = edit
    out = list(month)
    if what == "add" or not out:
        new = record(where % (24 * 30), NETWORK_BYTES_SENT, f"vm-{where}", quantity)
        if all(i.key != new.key for i in out):  # the store holds one record per key
            out.append(new)
    elif what == "adjust":
        target, ident = out[where % len(out)].key, 1 + max(i.ident for i in out)  # ids are unique
        out.append(Item(target, quantity - 450_000_000, ADJUSTMENT, target.window_end_ms + where, ident))
    elif what == "drop":
        del out[where % len(out)]
    else:  # grow the newest record, or change any one
        i = max(range(len(out)), key=lambda j: out[j].at_ms) if what == "grow" else where % len(out)
        out[i] = out[i]._replace(quantity=out[i].quantity + quantity)
    return out


def same(a: MonthCosts, b: MonthCosts) -> None:
    assert (a.cost, a.projected, a.lines, a.unpriced) == (b.cost, b.projected, b.lines, b.unpriced)
    assert a.items == b.items


@settings(max_examples=150, deadline=None)
@given(items, edits, st.integers(1, 5), st.randoms(use_true_random=False))
def test_rated_again_after_any_change_equals_rated_from_scratch(
    month: list[Item], changes: list[tuple[str, int, int]], checkpoint: int, order
) -> None:
    memo = RatingMemo(checkpoint=checkpoint)
    t, facts = tariff(), Facts()
    for edit in [None, *changes]:
        if edit is not None:
            month = edited(month, edit)
        shuffled = list(month)
        order.shuffle(shuffled)  # the store returns them in any order
        fresh = month_costs("acct", month, t, facts, NOW, START, END)
        same(month_costs("acct", shuffled, t, facts, NOW, START, END, memo), fresh)
    # a new tariff or other facts: rated again from the start, under them
    other = tariff(price="0.5")
    same(month_costs("acct", month, other, facts, NOW, START, END, memo),
         month_costs("acct", month, other, facts, NOW, START, END))  # fmt: skip


def test_only_what_follows_a_change_is_rated_again() -> None:
    month = [
        record(h, t, "vm-1", HOUR if t == RUNNING_VM else 10**8 + h)
        for h in range(100)
        for t in (RUNNING_VM, NETWORK_BYTES_SENT)
    ]
    memo = RatingMemo(checkpoint=16)
    t = tariff()
    first = month_costs("acct", month, t, Facts(), NOW, START, END, memo)
    assert (memo.rated_items, memo.reused_items) == (200, 0)
    assert month_costs("acct", month, t, Facts(), NOW, START, END, memo) == first
    assert (memo.rated_items, memo.reused_items) == (200, 200)
    grown = [*month[:-1], month[-1]._replace(quantity=month[-1].quantity + 5)]  # the open window
    again = month_costs("acct", grown, t, Facts(), NOW, START, END, memo)
    assert memo.rated_items - 200 <= 16  # from the checkpoint before the last item
    assert again.cost >= first.cost
    assert again.items[:-1] == first.items[:-1]
    late = [record(3, IP_ADDRESS, "ip-1", HOUR), *grown]  # a late record near the month's start
    memo.rated_items = 0
    assert month_costs("acct", late, t, Facts(), NOW, START, END, memo) == month_costs(
        "acct", late, t, Facts(), NOW, START, END
    )
    assert memo.rated_items == 201
    assert first.cost > Decimal(0)


def test_bounded_by_items_held() -> None:
    memo = RatingMemo(max_items=250)
    t = tariff()
    for n in range(5):
        month = [record(h, RUNNING_VM, "vm-1", HOUR) for h in range(100)]
        month_costs(f"acct-{n}", month, t, Facts(), NOW, START, END, memo)
    assert memo.held_items <= 250
    memo.rated_items = 0
    month_costs("acct-0", month, t, Facts(), NOW, START, END, memo)  # the oldest: dropped
    assert memo.rated_items == 100
