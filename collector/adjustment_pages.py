"""Adjustments a page at a time, for /v1/adjustments: created in [since, until), narrowed to
accounts, in the order they were made (row id), continuing after the last id of the previous
page (the primary key's order: a page costs its own rows)."""

from __future__ import annotations

from typing import NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from kvmeter.collector.model import UsageKey
from kvmeter.collector.schema import KEY_COLUMNS, usage_adjustments
from kvmeter.collector.store import Adjustment


class AdjustmentPage(NamedTuple):
    """Adjustments in order, and the id of the last of them (None for none): pass it as
    `after_id` for the next page."""

    rows: list[Adjustment]
    after_id: int | None


def page_adjustments(
    conn: Connection,
    since_ms: int,
    until_ms: int,
    *,
    accounts: frozenset[str] | None,
    limit: int,
    after_id: int | None = None,
) -> AdjustmentPage:
    """Up to `limit` adjustments; accounts None: every account's, else only theirs."""
    if (accounts is not None and not accounts) or limit <= 0:
        return AdjustmentPage([], None)
    adj = usage_adjustments.c
    query = (
        sa.select(*(adj[c] for c in KEY_COLUMNS), adj.delta, adj.reason, adj.created_ms, adj.id)
        .where(adj.created_ms >= since_ms, adj.created_ms < until_ms)
        .order_by(adj.id)
        .limit(limit)
    )
    if accounts is not None:
        query = query.where(adj.account.in_(sorted(accounts)))
    if after_id is not None:
        query = query.where(adj.id > after_id)
    rows, last = [], None
    for r in conn.execute(query):
        rows.append(Adjustment(UsageKey(*r[:7]), int(r[7]), r[8], int(r[9])))
        last = int(r[10])
    return AdjustmentPage(rows, last)
