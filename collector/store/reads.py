"""The read side: queries for the API, reports, metrics and the CLI, each in its own read
transaction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from kvmeter.collector import billable
from kvmeter.collector.model import Measure, UsageKey
from kvmeter.collector.schema import (
    KEY_COLUMNS,
    dead_letters,
    parked_measures,
    quarantined_measures,
    stream_gaps,
    stream_marks,
    unbilled_bytes,
    usage_adjustments,
    usage_records,
)
from kvmeter.collector.store.credits import mixed_currencies
from kvmeter.collector.store.engine import StoreCore
from kvmeter.collector.store.parking import measure_from_json


@dataclass(frozen=True)
class UsageRow:
    """A usage record as reported: net quantity = recorded quantity + adjustments."""

    key: UsageKey
    quantity: int
    recorded: int
    adjustment: int
    final: bool
    resource_name: str
    device_type: str
    updated_ms: int


@dataclass(frozen=True)
class Adjustment:
    """A change to a final window's record (its net is record + all its adjustments)."""

    key: UsageKey
    delta: int
    reason: str  # "late bytes", "late lifecycle", "policy change", "late attribution", "unattributed"
    created_ms: int
    seq: int = 0  # commit order: adjustments are listed, and paged, by it
    version: int = 1  # the record's version it made: n for the n-th adjustment of its record

    @property
    def transaction_id(self) -> str:
        return billable.transaction_id(self.key, self.version)


def _key_filters(
    cols: Any, start_ms: int, end_ms: int, account: str | None, usage_type: int | None, resource: str | None
) -> list[Any]:
    """WHERE terms on a table with the usage key columns: windows starting in [start, end)."""
    conds = [cols.window_start_ms >= start_ms, cols.window_start_ms < end_ms]
    for column, value in (("account", account), ("usage_type", usage_type), ("resource", resource)):
        if value is not None:
            conds.append(cols[column] == value)
    return conds


class Reads(StoreCore):
    """Whole-store queries, each in its own read transaction."""

    def usage(
        self,
        start_ms: int,
        end_ms: int,
        *,
        account: str | None = None,
        usage_type: int | None = None,
        resource: str | None = None,
    ) -> list[UsageRow]:
        """Records whose window starts in [start_ms, end_ms), with net quantities."""
        rec, adj = usage_records.c, usage_adjustments.c
        conds = _key_filters(rec, start_ms, end_ms, account, usage_type, resource)
        adj_conds = _key_filters(adj, start_ms, end_ms, account, usage_type, resource)
        with self.read() as conn:
            adjustments = {
                UsageKey(*row[:7]): int(row[7])
                for row in conn.execute(
                    sa.select(*(adj[c] for c in KEY_COLUMNS), sa.func.sum(adj.delta))
                    .where(*adj_conds)
                    .group_by(*(adj[c] for c in KEY_COLUMNS))
                )
            }
            query = sa.select(
                *(rec[c] for c in KEY_COLUMNS),
                rec.quantity,
                rec.final,
                rec.resource_name,
                rec.device_type,
                rec.updated_ms,
            ).where(*conds)
            rows = []
            for row in conn.execute(query):
                key = UsageKey(*row[:7])
                extra = adjustments.get(key, 0)
                rows.append(
                    UsageRow(
                        key,
                        int(row[7]) + extra,
                        int(row[7]),
                        extra,
                        bool(row[8]),
                        row[9],
                        row[10],
                        int(row[11]),
                    )
                )
        rows.sort(
            key=lambda r: (r.key.window_start_ms, r.key.account, r.key.usage_type, r.key.resource, r.key)
        )
        return rows

    def adjustments(
        self,
        since_ms: int,
        until_ms: int = 2**62,
        *,
        account: str | None = None,
        accounts: frozenset[str] | None = None,
        limit: int | None = None,
        after_seq: int | None = None,
    ) -> list[Adjustment]:
        """Adjustment rows created in [since_ms, until_ms), in the order they were committed:
        what changed in final windows, for a billing system that already took them. accounts:
        only theirs (an empty set: none); limit and after_seq (the last seq of the previous
        page) page them by seq, given in commit order, so a page never steps over a row another
        replica commits later (store/sequence.py), and a page costs its own rows."""
        if accounts is not None and not accounts:
            return []
        adj = usage_adjustments.c
        query = (
            sa.select(
                *(adj[c] for c in KEY_COLUMNS), adj.delta, adj.reason, adj.created_ms, adj.seq, adj.version
            )
            .where(adj.created_ms >= since_ms, adj.created_ms < until_ms, adj.seq.is_not(None))
            .order_by(adj.seq)
            .limit(limit)
        )
        if account is not None:
            query = query.where(adj.account == account)
        if accounts is not None:
            query = query.where(adj.account.in_(sorted(accounts)))
        if after_seq is not None:
            query = query.where(adj.seq > after_seq)
        with self.read() as conn:
            return [
                Adjustment(UsageKey(*r[:7]), int(r[7]), r[8], int(r[9]), int(r[10]), int(r[11]))
                for r in conn.execute(query)
            ]

    def net_usage(self) -> dict[UsageKey, int]:
        """Net quantity per key over the whole store (non-zero only): the replay comparison."""
        return {row.key: row.quantity for row in self.usage(0, 2**62) if row.quantity}

    def stats(self, horizon_start_ms: int) -> dict[str, int]:
        """Gauges for /metrics: parked bytes (all, and older than the horizon = unattributed),
        quarantined bytes, open dead letters, ..., accounts whose credits are in two currencies."""
        pm = parked_measures.c
        with self.read() as conn:
            parked = conn.execute(
                sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(pm.bytes), 0))
            ).one()
            unattributed = conn.execute(
                sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(pm.bytes), 0)).where(
                    pm.parked_ms < horizon_start_ms
                )
            ).one()
            reported = conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(pm.bytes), 0)).where(pm.reported_ms.is_not(None))
            ).scalar()
            quarantined = conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(quarantined_measures.c.bytes), 0))
            ).scalar()
            letters = conn.execute(  # open ones: a resolved letter is kept, not counted
                sa.select(sa.func.count()).where(dead_letters.c.resolved_ms.is_(None))
            ).scalar()
            unbilled = conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(unbilled_bytes.c.bytes), 0))
            ).scalar()
            g = stream_gaps.c
            missing = conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(g.last_seq - g.first_seq + 1), 0))
            ).scalar()
            records = conn.execute(sa.select(sa.func.count()).select_from(usage_records)).scalar()
            adjustments = conn.execute(sa.select(sa.func.count()).select_from(usage_adjustments)).scalar()
            mixed = mixed_currencies(conn)  # their credits count in no balance (balances.currencies)
        return {
            "parked_measures": int(parked[0]),
            "parked_bytes": int(parked[1]),
            "unattributed_measures": int(unattributed[0]),
            "unattributed_bytes": int(unattributed[1]),
            "reported_unattributed_bytes": int(reported or 0),
            "quarantined_bytes": int(quarantined or 0),
            "dead_letters": int(letters or 0),
            "unbilled_bytes": int(unbilled or 0),
            "missing_batches": int(missing or 0),
            "usage_records": int(records or 0),
            "usage_adjustments": int(adjustments or 0),
            "mixed_currency_accounts": len(mixed),
        }

    def dead_letter_rows(self) -> list[dict[str, Any]]:
        dl = dead_letters.c
        with self.read() as conn:
            query = sa.select(dl.source, dl.origin, dl.raw, dl.reason, dl.message, dl.created_ms).order_by(
                dl.id
            )
            return [dict(row) for row in conn.execute(query).mappings()]

    def parked_rows(self) -> list[Measure]:
        with self.read() as conn:
            query = sa.select(parked_measures.c.measure).order_by(parked_measures.c.id)
            return [measure_from_json(r[0]) for r in conn.execute(query)]

    def quarantined_rows(self) -> list[Measure]:
        with self.read() as conn:
            query = sa.select(quarantined_measures.c.measure).order_by(quarantined_measures.c.id)
            return [measure_from_json(r[0]) for r in conn.execute(query)]

    def unbilled(self) -> dict[UsageKey, int]:
        """Bytes of non-billable traffic per key (non-zero only)."""
        u = unbilled_bytes.c
        with self.read() as conn:
            rows = conn.execute(sa.select(*(u[c] for c in KEY_COLUMNS), u.bytes).where(u.bytes != 0))
            return {UsageKey(*row[:7]): int(row[7]) for row in rows}

    def marks(self) -> dict[str, int]:
        """Highest applied seq per stream."""
        with self.read() as conn:
            return {
                row[0]: int(row[1])
                for row in conn.execute(sa.select(stream_marks.c.stream_id, stream_marks.c.seq))
            }
