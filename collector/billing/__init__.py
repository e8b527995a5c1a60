"""Billing: tariffs, rating and costs, as fresh as the usage they are computed from.

    tariff       the model: one currency, rates per usage type over effective periods
    tariff_file  reading one from TOML (every problem listed), TariffSource (SIGHUP reloads)
    money        exact amounts, byte units, THE rounding rule (money.rounded)
    rating       pure: an account's month of items -> each item's cost (tiers, price changes)
    costs        pure: an account's month -> cost so far by usage type and resource, projection
    memo         ratings kept between requests: only what changed is rated again
    reads        the store side: a month's records and adjustments, zones and VM sizes

Costs are not stored: they are rated from the store's records and adjustments when asked, so
they are exactly as fresh as usage, the same after a rebuild, and a new tariff applies to
everything at once.

For code built on costs (balances, credits, alerts), the entry point is

    month_to_date(store, tariff, account, now_ms) -> MonthCosts

the account's cost so far in the UTC calendar month holding now_ms (`.cost`, a Decimal in
`.currency`, rounded by the one rule), its lines by usage type and resource (`.lines`,
`.by_usage_type()`), each record's and adjustment's cost (`.items`), what no rate covered
(`.unpriced`; `.complete` is False then) and the projection to the month's end (`.projected`).
months_costs() does the same for several accounts in one read.
"""

from __future__ import annotations

from kvmeter.collector.billing.costs import MonthCosts, month_bounds, month_costs
from kvmeter.collector.billing.memo import RatingMemo
from kvmeter.collector.billing.rating import Facts
from kvmeter.collector.billing.reads import month_items, rating_facts
from kvmeter.collector.billing.tariff import Tariff
from kvmeter.collector.store import Store

__all__ = ["MonthCosts", "RatingMemo", "Tariff", "month_bounds", "month_to_date", "months_costs"]


def months_costs(
    store: Store,
    tariff: Tariff,
    accounts: frozenset[str] | None,
    now_ms: int,
    *,
    month_ms: int | None = None,
    facts: Facts | None = None,
    memo: RatingMemo | None = None,
    project: bool = True,
) -> list[MonthCosts]:
    """The costs of the month holding month_ms (default: now's) for each account (None: every
    account with usage that month), as of now_ms, by account. memo: kept between calls, rates
    only what changed since (billing.memo). project False: no projection (costs so far only)."""
    start, end = month_bounds(now_ms if month_ms is None else month_ms)
    with store.read() as conn:
        items = month_items(conn, start, end, accounts)
        if facts is None:
            facts = rating_facts(store, conn)
    names = sorted(items) if accounts is None else sorted(accounts)
    return [
        month_costs(a, items.get(a, []), tariff, facts, now_ms, start, end, memo, project=project)
        for a in names
    ]


def month_to_date(store: Store, tariff: Tariff, account: str, now_ms: int) -> MonthCosts:
    """The account's cost so far this month (UTC), with its lines and projection."""
    return months_costs(store, tariff, frozenset({account}), now_ms)[0]
