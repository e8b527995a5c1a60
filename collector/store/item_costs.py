"""Costs of billable items, made in the transaction that makes the items.

    store.pricing = lambda conn: (tariff, facts)      # set where a [billing] tariff is configured
    price_items(conn, store, items, now_ms)           # adds "cost" to each item, in place

An item's cost is rated as /v1/costs rates it (billing/rating.py: the same rates, tiers, price
changes and facts) and rounded by the one rule (money.rounded) the same way: an item's amount
is its step in the account's rounded running total over the calendar month of its window. The
running total and the tier counters are kept per account and month (schema_item_costs) and grow
in the order items are made, so the items of a month, summed, are that month's rounded total to
the last digit. The row is locked by the first statement that touches it (an upsert), after the
records the transaction locked, in (account, month) order: two replicas take turns.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from kvmeter.collector.model import UsageKey
from kvmeter.collector.schema_item_costs import item_costs
from kvmeter.collector.store.engine import StoreCore

if TYPE_CHECKING:  # billing reads the store: imported where used
    from kvmeter.collector.billing.rating import Facts, Item, Rater
    from kvmeter.collector.billing.tariff import Tariff

Pricing = Callable[[Connection], "tuple[Tariff, Facts] | None"]


def tariff_identity(tariff: Tariff) -> str:
    """A digest of what prices (currency, decimals, every rate with its period): two tariff
    files that price alike have one identity, any change of price or period another."""
    text = repr((tariff.currency, tariff.decimals, tariff.rates))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def price_items(conn: Connection, store: StoreCore, items: Sequence[dict[str, Any]], now_ms: int) -> None:
    """Add each item's "cost" (items of billable.record_item / adjustment_item), in their order."""
    pricing: Pricing | None = getattr(store, "pricing", None)
    priced = pricing(conn) if pricing is not None and items else None
    if priced is None:
        return
    from kvmeter.collector.billing.costs import month_bounds

    tariff, facts = priced
    identity = tariff_identity(tariff)
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for item in items:
        groups.setdefault((item["account"], month_bounds(item["start_ms"])[0]), []).append(item)
    for (account, month), group in sorted(groups.items()):
        rater = _load(conn, store, account, month, tariff, facts, now_ms)
        rated = rater.rate([_rating_item(i) for i in group])
        for item, r in zip(group, rated, strict=True):
            cost: dict[str, Any] = {
                "amount": format(r.cost, "f"),
                "currency": tariff.currency,
                "tariff": identity,
                "rates": list(r.rates),
            }
            if r.unpriced:
                cost |= {"unpriced": r.unpriced, "unpriced_reason": r.reason}
            item["cost"] = cost
        counters = [[*group_key, n] for group_key, n in sorted(rater.counters.items()) if n]
        conn.execute(
            sa.update(item_costs)
            .where(item_costs.c.account == account, item_costs.c.month_start_ms == month)
            .values(
                total_scaled=format(rater.total, "f"),
                counters=json.dumps(counters),
                currency=tariff.currency,
                updated_ms=now_ms,
            )
        )


def _load(
    conn: Connection, store: StoreCore, account: str, month: int, tariff: Tariff, facts: Facts, now_ms: int
) -> Rater:
    """The account's month as it stands, its row locked (created empty the first time)."""
    from kvmeter.collector.billing.rating import Rater

    fresh = {"total_scaled": "0", "counters": "[]", "currency": tariff.currency, "updated_ms": now_ms}
    stmt = store._insert(item_costs).values(account=account, month_start_ms=month, **fresh)
    # An upsert that changes nothing but takes the row's lock (PostgreSQL), created or found.
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["account", "month_start_ms"], set_={"account": stmt.excluded.account}
        )
    )
    ic = item_costs.c
    row = conn.execute(
        sa.select(ic.total_scaled, ic.counters).where(ic.account == account, ic.month_start_ms == month)
    ).one()
    counters = {(int(t), str(traffic), str(zone)): int(n) for t, traffic, zone, n in json.loads(row[1])}
    return Rater(tariff, facts, counters, Decimal(row[0]))


def _rating_item(item: dict[str, Any]) -> Item:
    from kvmeter.collector.billing.rating import ADJUSTMENT, RECORD, Item
    from kvmeter.collector.billing.tariff import BYTE_TYPES
    from kvmeter.collector.vm_size import size_text

    # The record's detail: a byte record's traffic type, a VM time record's own size (a custom
    # offering's "2/2048", as /v1/costs rates it), else "".
    if item["usage_type"] in BYTE_TYPES:
        detail = item["traffic_type"]
    else:
        detail = size_text(item.get("cpunumber"), item.get("memory"))
    key = UsageKey(
        item["account"],
        item["usage_type"],
        item["resource"],
        item["offering"],
        detail,
        item["start_ms"],
        item["end_ms"],
    )
    kind = RECORD if item["kind"] == "record" else ADJUSTMENT
    return Item(key, int(item["quantity"]), kind, int(item["made_ms"]), int(item["version"]))


def carry(source: Connection, into: Connection, store: StoreCore) -> int:
    """A rebuild: the running totals the live store's items were made under, so the new store's
    next items continue the live store's month (the live store may predate them: none)."""
    if not sa.inspect(source).has_table(item_costs.name):
        return 0
    rows = [dict(row._mapping) for row in source.execute(sa.select(item_costs))]
    if rows:
        into.execute(store._insert(item_costs).on_conflict_do_nothing(), rows)
    return len(rows)
