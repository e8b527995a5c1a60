"""Each watched account's costs since its first credit, for the balance check, without rating
every month again at every evaluation.

- The current month is rated at each evaluation, through a RatingMemo: only what follows the
  first changed item (the open windows growing) is rated again.
- A closed month's cost is kept per account with the month's fingerprint in the store: of its
  records, how many, their quantities summed, their last write (updated_ms) and their versions
  summed; of its adjustments, how many, the last id and their deltas summed. One aggregate query
  per closed month tells which accounts' months changed (a late record, an adjustment, a
  rebuild or a prune); only those are rated again, and a month with no usage costs zero
  without rating.
- A new tariff, new facts (zones, VM sizes), or `full_every_s` since the last full pass (a
  change no fingerprint shows, however unlikely, is not kept longer than that): every kept
  cost is dropped and rated again.

The fingerprint is read before the month's items, so a change between the two reads is seen by
the next evaluation, never hidden.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from decimal import Decimal

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from kvmeter.collector.billing import RatingMemo, Tariff, month_bounds, months_costs
from kvmeter.collector.billing.rating import Facts
from kvmeter.collector.billing.reads import rating_facts
from kvmeter.collector.schema import usage_adjustments, usage_records
from kvmeter.collector.store import Store

Fingerprint = tuple[int, ...]
FULL_EVERY_S = 3600.0


def months(first_ms: int, now_ms: int) -> Iterator[int]:
    """The start of every UTC month from first_ms's through now_ms's."""
    start, _ = month_bounds(first_ms)
    while start <= now_ms:
        yield start
        start = month_bounds(start)[1]


def fingerprints(
    conn: Connection, accounts: frozenset[str], start_ms: int, end_ms: int
) -> dict[str, Fingerprint]:
    """{account: its month's fingerprint} for the accounts with usage in [start_ms, end_ms)."""
    rec, adj = usage_records.c, usage_adjustments.c
    names = sorted(accounts)
    out: dict[str, list[int]] = {}
    records = (
        sa.select(
            rec.account,
            sa.func.count(),
            sa.func.sum(rec.quantity),
            sa.func.max(rec.updated_ms),
            sa.func.sum(rec.version),
        )
        .where(rec.account.in_(names), rec.window_start_ms >= start_ms, rec.window_start_ms < end_ms)
        .group_by(rec.account)
    )
    adjustments = (
        sa.select(adj.account, sa.func.count(), sa.func.max(adj.id), sa.func.sum(adj.delta))
        .where(adj.account.in_(names), adj.window_start_ms >= start_ms, adj.window_start_ms < end_ms)
        .group_by(adj.account)
    )
    for row in conn.execute(records):
        out[str(row[0])] = [int(v or 0) for v in row[1:]] + [0, 0, 0]
    for row in conn.execute(adjustments):
        out.setdefault(str(row[0]), [0, 0, 0, 0, 0, 0, 0])[4:] = [int(v or 0) for v in row[1:]]
    return {a: tuple(v) for a, v in out.items()}


class CostsSince:
    """Costs per account from the month of a given instant through now, kept between calls."""

    def __init__(
        self,
        store: Store,
        *,
        full_every_s: float = FULL_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
        memo: RatingMemo | None = None,
    ):
        self.store = store
        self.full_every_s = full_every_s
        self.clock = clock
        self.memo = memo if memo is not None else RatingMemo()
        self._kept: dict[tuple[str, int], tuple[Fingerprint, Decimal]] = {}
        self._basis: tuple[Tariff, Facts] | None = None
        self._full_at = 0.0
        self.rated_months = 0  # account-months rated, kept cost reused (for tests and the bench)
        self.kept_months = 0

    def costs(self, tariff: Tariff, since: Mapping[str, int], now_ms: int) -> dict[str, Decimal]:
        """{account: its costs over every month from since[account]'s through now_ms's}."""
        out = dict.fromkeys(since, Decimal(0))
        if not since:
            return out
        with self.store.read() as conn:
            facts = rating_facts(self.store, conn)
        self._check_basis(tariff, facts)
        current, _ = month_bounds(now_ms)
        for month in months(min(since.values()), now_ms):
            end = month_bounds(month)[1]
            owing = frozenset(a for a, first in since.items() if first < end)
            if month >= current:
                costs = months_costs(
                    self.store,
                    tariff,
                    owing,
                    now_ms,
                    month_ms=month,
                    facts=facts,
                    memo=self.memo,
                    project=False,
                )
                self.rated_months += len(costs)
                for c in costs:
                    out[c.account] += c.cost
                continue
            for account, cost in self._closed(tariff, facts, owing, month, end, now_ms).items():
                out[account] += cost
        return out

    def _check_basis(self, tariff: Tariff, facts: Facts) -> None:
        now = self.clock()
        basis = self._basis
        if basis is None or basis[0] != tariff or basis[1] != facts or now >= self._full_at:
            self._kept.clear()
            self._basis, self._full_at = (tariff, facts), now + self.full_every_s

    def _closed(
        self, tariff: Tariff, facts: Facts, owing: frozenset[str], month: int, end: int, now_ms: int
    ) -> dict[str, Decimal]:
        with self.store.read() as conn:
            prints = fingerprints(conn, owing, month, end)
        out: dict[str, Decimal] = {}
        stale = set()
        for account in owing:
            printed = prints.get(account)
            kept = self._kept.get((account, month))
            if printed is None:
                out[account] = Decimal(0)  # no usage that month
            elif kept is not None and kept[0] == printed:
                out[account] = kept[1]
                self.kept_months += 1
            else:
                stale.add(account)
        if stale:
            stale_costs = months_costs(
                self.store, tariff, frozenset(stale), now_ms, month_ms=month, facts=facts, project=False
            )
            for c in stale_costs:
                out[c.account] = c.cost
                self._kept[c.account, month] = (prints[c.account], c.cost)
                self.rated_months += 1
        return out
