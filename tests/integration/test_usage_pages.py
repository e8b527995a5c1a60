"""The paged usage query on both stores: filters, accounts, a stable order, cursors, the total
count; and UsagePager's kept counts and cursors, which must give what a fresh query gives."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmeter.collector.model import UsageKey
from kvmeter.collector.store import Store
from kvmeter.collector.store.pages import UsageFilter, UsagePager, count_usage, page_usage
from tests.collector_support import ACCT_A, ACCT_B, HOUR, T0

N = 30  # windows; one record per window and account, two accounts, plus a byte type


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.pg)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    url = (
        f"sqlite:///{tmp_path}/usage.db"
        if request.param == "sqlite"
        else request.getfixturevalue("pg_database")
    )
    s = Store(url)
    s.migrate()
    add(s, {UsageKey(a, t, f"vm-{a[-1]}", "", "public", T0 + i * HOUR, T0 + (i + 1) * HOUR): 10 + i
            for i in range(N) for a in (ACCT_A, ACCT_B) for t in (4, 5)})  # fmt: skip
    add(s, {UsageKey("", 4, "unknown", "", "public", T0, T0 + HOUR): 5})
    yield s
    s.close()


def add(store: Store, rows: dict[UsageKey, int], final_through: int = 0) -> None:
    with store.write() as conn:
        store.add_bytes(conn, rows, {}, final_through, T0)


ALL = UsageFilter(T0, T0 + N * HOUR)


def test_filters_order_count_and_net_quantities(store: Store) -> None:
    with store.read() as conn:
        assert count_usage(conn, ALL) == 4 * N + 1
        assert count_usage(conn, UsageFilter(T0, T0 + N * HOUR, attributed_only=True)) == 4 * N
        only_a = UsageFilter(T0, T0 + N * HOUR, accounts=frozenset({ACCT_A}), usage_type=5)
        rows = page_usage(conn, only_a, limit=100).rows
        assert [r.key.window_start_ms for r in rows] == [T0 + i * HOUR for i in range(N)]
        assert {(r.key.account, r.key.usage_type) for r in rows} == {(ACCT_A, 5)}
        assert count_usage(conn, UsageFilter(T0, T0 + N * HOUR, accounts=frozenset())) == 0
        assert count_usage(conn, UsageFilter(T0, T0 + 2 * HOUR, ends_by_ms=T0 + HOUR)) == 5
        assert count_usage(conn, UsageFilter(T0, T0 + N * HOUR, keyword="VM-B")) == 2 * N
        assert count_usage(conn, UsageFilter(T0, T0 + N * HOUR, keyword="_")) == 0  # not a wildcard
    add(store, {UsageKey(ACCT_A, 4, "vm-a", "", "public", T0, T0 + HOUR): 7}, final_through=T0 + N * HOUR)
    with store.read() as conn:
        only = UsageFilter(T0, T0 + HOUR, accounts=frozenset({ACCT_A}), usage_type=4)
        (first,) = page_usage(conn, only, limit=5).rows
    assert (first.quantity, first.recorded, first.adjustment) == (17, 10, 7)


def test_cursor_pages_tile_the_offset_pages(store: Store) -> None:
    with store.read() as conn:
        whole = page_usage(conn, ALL, limit=1000).rows
        by_cursor, after = [], None
        while (page := page_usage(conn, ALL, limit=7, after=after)).rows:
            by_cursor += page.rows
            after = page.after
        by_offset = [
            r for o in range(0, len(whole), 7) for r in page_usage(conn, ALL, limit=7, offset=o).rows
        ]
    assert by_cursor == by_offset == whole
    assert len(whole) == 4 * N + 1


def test_the_pager_counts_and_pages_like_a_fresh_query(store: Store) -> None:
    clock = [0.0]
    pager = UsagePager(ttl_s=60, clock=lambda: clock[0])
    through = T0 + 10 * HOUR  # windows before it are final
    with store.read() as conn:
        assert pager.count(conn, ALL, through) == 4 * N + 1
        pages = [pager.page(conn, ALL, limit=8, offset=o) for o in range(0, 4 * N + 1, 8)]
        assert [r for p in pages for r in p] == page_usage(conn, ALL, limit=1000).rows
    # A new record in an open window counts at once; a late one in a final window (a zero record
    # and its adjustment) once the kept figure is older than the ttl.
    add(store, {UsageKey(ACCT_A, 4, "vm-new", "", "public", T0 + 20 * HOUR, T0 + 21 * HOUR): 1})
    add(store, {UsageKey(ACCT_A, 4, "vm-late", "", "public", T0, T0 + HOUR): 1}, final_through=through)
    with store.read() as conn:
        assert pager.count(conn, ALL, through) == 4 * N + 2
        clock[0] = 61.0
        assert pager.count(conn, ALL, through) == 4 * N + 3 == count_usage(conn, ALL)
