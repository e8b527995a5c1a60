"""Usage records a page at a time: filtered, narrowed to accounts, in a stable order, with the
total count. For listUsageRecords (offset paging, CloudStack's page/pagesize) and /v1/usage
(cursor paging: `after` the last row of the previous page).

Order: (window_start_ms, id), an index walk on both databases (migrations 7, 9), so a page from a
cursor costs its own rows however large the store is. Net quantities (record + adjustments) are
summed for the page's rows only. UsagePager keeps offset paging and the total count cheap for
clients that page in order, as CloudStack clients do (see there).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from kvmeter.collector.model import UNATTRIBUTED, UsageKey
from kvmeter.collector.schema import KEY_COLUMNS, usage_adjustments, usage_records
from kvmeter.collector.store.engine import StoreCore
from kvmeter.collector.store.reads import UsageRow
from kvmeter.collector.windows import DAY_MS


@dataclass(frozen=True)
class UsageFilter:
    """Which records: window start in [start_ms, end_ms); with ends_by_ms, window end at or
    before it too (CloudStack: the whole window in the range). accounts None: every account,
    else only these (an empty set: none). keyword: a case-insensitive part of the resource's
    name or uuid. attributed_only leaves out bytes that no account owns."""

    start_ms: int
    end_ms: int
    ends_by_ms: int | None = None
    ends_after_ms: int | None = None  # window end after it (UsagePager's split of the count)
    accounts: frozenset[str] | None = None
    usage_type: int | None = None
    resource: str | None = None
    resource_any_case: bool = False  # resource as given, in lower or in upper case
    keyword: str | None = None
    attributed_only: bool = False


class UsagePage(NamedTuple):
    """Records in order, and the cursor after the last of them (None for no records): pass it
    as `after` for the next page."""

    rows: list[UsageRow]
    after: tuple[int, int] | None  # (window_start_ms, id)


def count_usage(conn: Connection, flt: UsageFilter) -> int:
    """How many records match (CloudStack's `count`)."""
    if _matches_nothing(flt):
        return 0
    query = sa.select(sa.func.count()).select_from(usage_records).where(*_conditions(flt))
    return int(conn.execute(query).scalar() or 0)


def account_has_usage(conn: Connection, account: str) -> bool:
    """Whether any record is the account's (an index lookup: the record key starts with it)."""
    query = sa.select(usage_records.c.id).where(usage_records.c.account == account).limit(1)
    return conn.execute(query).first() is not None


def page_usage(
    conn: Connection,
    flt: UsageFilter,
    *,
    limit: int,
    offset: int = 0,
    after: tuple[int, int] | None = None,
) -> UsagePage:
    """Up to `limit` records in (window_start_ms, id) order, skipping `offset` of them, or
    starting after the cursor `after`."""
    if _matches_nothing(flt) or limit <= 0:
        return UsagePage([], None)
    rec = usage_records.c
    conds = _conditions(flt)
    if after is not None:
        conds.append(sa.tuple_(rec.window_start_ms, rec.id) > sa.tuple_(*after))
    ids = (
        sa.select(rec.id)
        .where(*conds)
        .order_by(rec.window_start_ms, rec.id)
        .limit(limit)
        .offset(offset)
        .subquery("page")
    )
    page = usage_records.alias("r")
    adj = usage_adjustments.c
    adjustment = (
        sa.select(sa.func.coalesce(sa.func.sum(adj.delta), 0))
        .where(*(adj[c] == page.c[c] for c in KEY_COLUMNS))
        .scalar_subquery()
    )
    query = (
        sa.select(
            *(page.c[c] for c in KEY_COLUMNS),
            page.c.quantity,
            adjustment,
            page.c.final,
            page.c.resource_name,
            page.c.device_type,
            page.c.updated_ms,
            page.c.id,
        )
        .join_from(page, ids, page.c.id == ids.c.id)
        .order_by(page.c.window_start_ms, page.c.id)
    )
    rows, last_id = [], 0
    for r in conn.execute(query).all():  # one fetch, not a cursor call per row
        recorded, extra = int(r[7]), int(r[8])
        key = UsageKey(*r[:7])
        rows.append(UsageRow(key, recorded + extra, recorded, extra, bool(r[9]), r[10], r[11], int(r[12])))
        last_id = int(r[13])
    return UsagePage(rows, (rows[-1].key.window_start_ms, last_id) if rows else None)


def _matches_nothing(flt: UsageFilter) -> bool:
    return flt.accounts is not None and not flt.accounts


def _conditions(flt: UsageFilter) -> list[Any]:
    rec = usage_records.c
    # Windows are at most a day, so a window ending after T starts after T - 1 day: one lower
    # bound on the start keeps the scan an index range (SQLite uses only one of two bounds).
    lowest = flt.start_ms if flt.ends_after_ms is None else max(flt.start_ms, flt.ends_after_ms - DAY_MS)
    conds: list[Any] = [rec.window_start_ms >= lowest, rec.window_start_ms < flt.end_ms]
    if flt.ends_by_ms is not None:
        conds.append(rec.window_end_ms <= flt.ends_by_ms)
    if flt.ends_after_ms is not None:
        conds.append(rec.window_end_ms > flt.ends_after_ms)
    if flt.accounts is not None:
        conds.append(rec.account.in_(sorted(flt.accounts)))
    if flt.attributed_only:
        conds.append(rec.account != UNATTRIBUTED)
    if flt.usage_type is not None:
        conds.append(rec.usage_type == flt.usage_type)
    if flt.resource is not None and flt.resource_any_case:  # uuids are stored in one case
        conds.append(rec.resource.in_(sorted({flt.resource, flt.resource.lower(), flt.resource.upper()})))
    elif flt.resource is not None:
        conds.append(rec.resource == flt.resource)
    if flt.keyword:
        escaped = flt.keyword.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = f"%{escaped}%"
        conds.append(
            sa.or_(
                sa.func.lower(rec.resource_name).like(pattern, escape="\\"),
                sa.func.lower(rec.resource).like(pattern, escape="\\"),
            )
        )
    return conds


class UsagePages(StoreCore):
    """The paged query in a read transaction of its own, for callers that need nothing else
    from the same read (count_usage and page_usage take the caller's connection)."""

    def usage_page(
        self, flt: UsageFilter, *, limit: int, offset: int = 0, after: tuple[int, int] | None = None
    ) -> UsagePage:
        with self.read() as conn:
            return page_usage(conn, flt, limit=limit, offset=offset, after=after)

    def usage_count(self, flt: UsageFilter) -> int:
        with self.read() as conn:
            return count_usage(conn, flt)


class UsagePager:
    """Offset pages and counts for one API process, cheap for clients that page in order.

    count: records of windows that were final when first counted (window end <= the store's
    finalized_through then) are counted once per filter and the figure kept for `ttl_s`: such a
    record is never deleted, and one arrives there only when late data for a final window makes
    a new (zero) record, which the count then shows within `ttl_s`. The rest (windows that were
    still open, at most a day back from that instant) is counted on every call.
    page: the cursor after each page served is kept per (filter, offset), so asking for the next
    page walks the index from there instead of skipping `offset` rows.
    """

    def __init__(
        self, *, ttl_s: float = 60.0, max_entries: int = 4096, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_s, self.max_entries, self.clock = ttl_s, max_entries, clock
        self._lock = threading.Lock()
        self._settled: OrderedDict[UsageFilter, tuple[float, int, int]] = OrderedDict()  # at, through, n
        self._cursors: OrderedDict[tuple[UsageFilter, int], tuple[float, tuple[int, int]]] = OrderedDict()

    def count(self, conn: Connection, flt: UsageFilter, finalized_through: int) -> int:
        now = self.clock()
        with self._lock:
            known = self._fresh(self._settled, flt, now)
        if known is None:
            through = finalized_through if flt.ends_by_ms is None else min(finalized_through, flt.ends_by_ms)
            known = (now, through, count_usage(conn, replace(flt, ends_by_ms=through)))
            with self._lock:
                self._keep(self._settled, flt, known)
        _, through, settled = known
        return settled + count_usage(conn, replace(flt, ends_after_ms=through))

    def page(self, conn: Connection, flt: UsageFilter, *, limit: int, offset: int) -> list[UsageRow]:
        now = self.clock()
        with self._lock:
            cursor = self._fresh(self._cursors, (flt, offset), now) if offset else None
        if cursor is None:
            page = page_usage(conn, flt, limit=limit, offset=offset)
        else:
            page = page_usage(conn, flt, limit=limit, after=cursor[1])
        if page.after is not None:
            with self._lock:
                self._keep(self._cursors, (flt, offset + len(page.rows)), (now, page.after))
        return page.rows

    def _fresh(self, memo: OrderedDict[Any, Any], key: Any, now: float) -> Any:
        entry = memo.get(key)
        if entry is None or now - entry[0] > self.ttl_s:
            return None
        memo.move_to_end(key)
        return entry

    def _keep(self, memo: OrderedDict[Any, Any], key: Any, entry: Any) -> None:
        memo[key] = entry
        memo.move_to_end(key)
        while len(memo) > self.max_entries:
            memo.popitem(last=False)
