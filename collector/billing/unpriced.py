"""What no rate prices: the records and adjustments of a period that the tariff in force leaves
(partly) unpriced, by usage type, without rating the period.

One aggregate query per table groups the period's usage by usage type, offering, detail and
resource with its first window start and last window end; a group whose whole span is priced
(a rate in force all along, and the VM's size known where a rate is per vCPU or GiB) is done.
Only the rows of the other groups are read, and each is rated alone: what no rate covers does
not depend on tiers or on the order of items, so it is exactly what a rating of the month lists
as unpriced (MonthCosts.unpriced).
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from kvmeter.collector.billing.rating import ADJUSTMENT, RECORD, Facts, Item, Rater
from kvmeter.collector.billing.tariff import Tariff
from kvmeter.collector.model import UsageKey
from kvmeter.collector.schema import KEY_COLUMNS, usage_adjustments, usage_records

_GROUP = ("usage_type", "offering", "detail", "resource")


@dataclass
class Unpriced:
    """Of one usage type: the records and adjustments some of whose quantity no rate prices, and
    that quantity (ms or bytes, adjustments' deltas counted as they are)."""

    items: int = 0
    quantity: int = 0


def covered(tariff: Tariff, facts: Facts, usage_type: int, offering: str, detail: str, resource: str,
            start_ms: int, end_ms: int) -> bool:  # fmt: skip
    """Whether a rate prices this usage over all of [start_ms, end_ms)."""
    zone = facts.zone(resource) if facts.zones else ""
    for _, _, rate in tariff.periods(usage_type, offering, detail, zone, start_ms, end_ms):
        if rate is None or (rate.needs_size and facts.size(resource, offering) is None):
            return False
    return True


def unpriced(
    conn: Connection, tariff: Tariff, facts: Facts, start_ms: int, end_ms: int
) -> dict[int, Unpriced]:
    """{usage type: what no rate prices} over the records and adjustments of windows starting in
    [start_ms, end_ms); usage types with nothing unpriced are left out."""
    out: dict[int, Unpriced] = {}
    rater = Rater(tariff, facts)
    for table, amount, kind in (
        (usage_records, "quantity", RECORD),
        (usage_adjustments, "delta", ADJUSTMENT),
    ):
        c = table.c
        in_period = sa.and_(c.window_start_ms >= start_ms, c.window_start_ms < end_ms)
        groups = (
            sa.select(*(c[g] for g in _GROUP), sa.func.min(c.window_start_ms), sa.func.max(c.window_end_ms))
            .where(in_period)
            .group_by(*(c[g] for g in _GROUP))
        )
        for row in conn.execute(groups).all():
            usage_type, offering, detail, resource = int(row[0]), str(row[1]), str(row[2]), str(row[3])
            if covered(tariff, facts, usage_type, offering, detail, resource, int(row[4]), int(row[5])):
                continue
            rows = sa.select(*(c[k] for k in KEY_COLUMNS), c[amount]).where(
                in_period, *(c[g] == v for g, v in zip(_GROUP, row[:4], strict=True))
            )
            for key_row in conn.execute(rows):
                item = Item(UsageKey(*key_row[:7]), int(key_row[7]), kind)
                [rated] = rater.rate([item])
                if rated.unpriced:
                    found = out.setdefault(usage_type, Unpriced())
                    found.items += 1
                    found.quantity += rated.unpriced
    return out
