"""An account's month: cost so far by usage type and resource, and a projection to the month's
end. Pure: items, facts and a tariff in, MonthCosts out.

The projection rates, after the month's real items and under the same tiers and price changes:
- for each time-based resource running now (its record of the current window has run all of the
  window so far, give or take `slack_ms`), the rest of the month at full time;
- for each byte record series (resource, direction, traffic type), the month's bytes so far
  spread at the same rate over the rest of the month.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal

from kvmeter.collector.billing.memo import RatingMemo
from kvmeter.collector.billing.rating import (
    ADJUSTMENT,
    PROJECTION,
    RECORD,
    Facts,
    Item,
    RatedItem,
    Rater,
    month_order,
)
from kvmeter.collector.billing.tariff import BYTE_TYPES, Tariff
from kvmeter.collector.model import UsageKey

SLACK_MS = 120_000  # a running VM's current record trails now by a tick or two


def month_bounds(time_ms: int) -> tuple[int, int]:
    """[start, end) of the UTC calendar month holding time_ms."""
    day = dt.datetime.fromtimestamp(time_ms // 1000, dt.UTC)
    start = dt.datetime(day.year, day.month, 1, tzinfo=dt.UTC)
    end = dt.datetime(day.year + day.month // 12, day.month % 12 + 1, 1, tzinfo=dt.UTC)
    return int(start.timestamp()) * 1000, int(end.timestamp()) * 1000


@dataclass
class CostLine:
    """One usage type of one resource over the month (`detail`: traffic type or offering)."""

    usage_type: int
    resource: str
    detail: str
    quantity: int = 0  # ms or bytes, net of adjustments
    cost: Decimal = Decimal(0)
    projected: Decimal = Decimal(0)  # cost at the month's end (cost + the projection's)
    unpriced: int = 0  # of the quantity, what no rate covered


@dataclass
class MonthCosts:
    account: str
    currency: str
    start_ms: int
    end_ms: int
    as_of_ms: int
    cost: Decimal  # so far: the sum of every line's (and every item's) cost
    projected: Decimal  # at the month's end
    lines: list[CostLine] = field(default_factory=list)
    items: list[RatedItem] = field(default_factory=list)  # real ones, each with its cost
    unpriced: list[RatedItem] = field(default_factory=list)  # items some of which no rate covered

    @property
    def complete(self) -> bool:
        return not self.unpriced

    def by_usage_type(self) -> dict[int, tuple[Decimal, Decimal]]:
        out: dict[int, tuple[Decimal, Decimal]] = {}
        for line in self.lines:
            cost, projected = out.get(line.usage_type, (Decimal(0), Decimal(0)))
            out[line.usage_type] = (cost + line.cost, projected + line.projected)
        return dict(sorted(out.items()))


def projected_items(
    items: list[Item], now_ms: int, start_ms: int, end_ms: int, slack_ms: int = SLACK_MS
) -> list[Item]:
    """What the rest of the month would add if what runs now keeps running and bytes keep their
    month's rate (see the module's docstring). Nothing once the month is over."""
    if now_ms >= end_ms or now_ms <= start_ms:
        return []
    rest = end_ms - now_ms
    out: list[Item] = []
    running: dict[tuple[str, int, str, str, str], UsageKey] = {}  # by key less window, in order
    byte_totals: dict[tuple[str, int, str, str, str], int] = defaultdict(int)
    for item in items:
        k = item.key
        if k.usage_type in BYTE_TYPES:
            byte_totals[k[:5]] += item.quantity
        elif item.kind == RECORD and _runs_now(item, now_ms, slack_ms):
            running.setdefault(k[:5], k._replace(window_start_ms=now_ms, window_end_ms=end_ms))
    out.extend(Item(series, rest, PROJECTION, now_ms) for series in running.values())
    elapsed = now_ms - start_ms
    for head, total in sorted(byte_totals.items()):
        if total > 0:
            out.append(Item(UsageKey(*head, now_ms, end_ms), total * rest // elapsed, PROJECTION, now_ms))
    return out


def _runs_now(item: Item, now_ms: int, slack_ms: int) -> bool:
    """A time record whose resource runs now: its window holds now and it has run all of it so
    far; or, in the first moments of a window no tick has opened yet, it ran to its window's end."""
    k = item.key
    if k.window_start_ms <= now_ms < k.window_end_ms:
        return item.quantity >= now_ms - k.window_start_ms - slack_ms
    if k.window_end_ms <= now_ms < k.window_end_ms + slack_ms:
        return item.quantity >= k.window_end_ms - k.window_start_ms - slack_ms
    return False


def month_costs(
    account: str,
    items: list[Item],
    tariff: Tariff,
    facts: Facts,
    now_ms: int,
    start_ms: int,
    end_ms: int,
    memo: RatingMemo | None = None,
    *,
    project: bool = True,
) -> MonthCosts:
    """items: the account's records (recorded quantities) and adjustments of windows in
    [start_ms, end_ms), in any order. memo: rate again only what changed since its last rating
    of this month (the same result). project False: no projection (`projected` is the cost)."""
    ordered = sorted(items, key=month_order)
    if memo is None:
        rater = Rater(tariff, facts)
        rated = rater.rate(ordered)
    else:
        rated, rater = memo.rate(account, start_ms, ordered, tariff, facts)
    so_far = rater.rounded_total
    projecting = projected_items(ordered, now_ms, start_ms, end_ms) if project else []
    projection = rater.rate(sorted(projecting, key=month_order))
    lines: dict[tuple[int, str, str], CostLine] = {}
    for r in (*rated, *projection):
        k = r.item.key
        detail = k.detail if k.usage_type in BYTE_TYPES else k.offering
        line = lines.get((k.usage_type, k.resource, detail))
        if line is None:  # (not setdefault: a CostLine built per item costs more than the rest)
            line = lines[k.usage_type, k.resource, detail] = CostLine(k.usage_type, k.resource, detail)
        line.projected += r.cost
        if r.item.kind in (RECORD, ADJUSTMENT):
            line.cost += r.cost
            line.quantity += r.item.quantity
            line.unpriced += r.unpriced
    return MonthCosts(
        account=account,
        currency=tariff.currency,
        start_ms=start_ms,
        end_ms=end_ms,
        as_of_ms=now_ms,
        cost=so_far,
        projected=rater.rounded_total,
        lines=[lines[k] for k in sorted(lines)],
        items=rated,
        unpriced=[r for r in rated if r.unpriced],
    )
