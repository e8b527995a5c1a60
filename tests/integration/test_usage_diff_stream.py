"""`kvmeter rebuild`'s diff, streamed (store/window_totals.py + usage_diff.merge_differences), is
the diff of the two stores loaded whole (by_window + differences), on SQLite, PostgreSQL and one of
each: records over accounts whose order differs between collations, usage types, windows and
resources; adjustments; zero nets; keys in one store only; open windows left out or not."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmeter.collector.model import UsageKey
from kvmeter.collector.store import Store
from kvmeter.collector.store.window_totals import window_totals
from kvmeter.collector.usage_diff import WindowKey, by_window, differences, merge_differences
from tests.harness import postgres

W = 3_600_000
T0 = 1_715_677_200_000
FAR = 2**62
# Code-point order differs from a locale's: upper case first, accents after z, a space, digits.
ACCOUNTS = ["alpha", "Zeta", "b", "Ähre", "a b", "ab", "a-b", "10", "9", "émile", "zz"]


@pytest.fixture(params=["sqlite-sqlite", "sqlite-postgresql", "postgresql-postgresql"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Store, Store]]:
    kinds = request.param.split("-")
    made = []
    for n, kind in enumerate(kinds):
        if kind == "sqlite":
            url = f"sqlite:///{tmp_path}/usage-{n}.db"
        else:
            url = postgres.create_database(request.getfixturevalue("pg_dsn"))
        made.append(Store(url))
        made[-1].migrate()
    yield made[0], made[1]
    for s in made:
        s.close()


def _fill(store: Store, rng: random.Random, shared: dict[UsageKey, int]) -> None:
    """The shared increments (same in both stores), some of this store's own, then the first
    windows final and late bytes into them (adjustments, some netting a key to zero)."""
    own: dict[UsageKey, int] = {}
    for _ in range(150):
        key = UsageKey(
            rng.choice(ACCOUNTS), rng.choice([4, 5]), f"vm-{rng.randrange(5)}", "",
            rng.choice(["public", "guest"]), T0 + rng.randrange(8) * W, 0,
        )  # fmt: skip
        own[key._replace(window_end_ms=key.window_start_ms + W)] = rng.randrange(1, 1000)
    increments = {**shared, **own}
    names = {k: ("", "") for k in increments}
    with store.write() as conn:
        store.add_bytes(conn, increments, names, 0, T0)
        store.finalize(conn, T0 + 4 * W, T0 + 5 * W)
    late = {k: (-q if rng.random() < 0.3 else rng.randrange(1, 50)) for k, q in increments.items()}
    late = {k: q for k, q in late.items() if k.window_end_ms <= T0 + 4 * W and rng.random() < 0.5}
    with store.write() as conn:
        store.add_bytes(conn, late, {k: ("", "") for k in late}, T0 + 4 * W, T0 + 6 * W)


@pytest.mark.parametrize("through", [None, T0 + 4 * W])
def test_the_streamed_diff_is_the_whole_diff(stores: tuple[Store, Store], through: int | None) -> None:
    live, rebuilt = stores
    rng = random.Random(7)
    shared = {
        UsageKey(a, 4, "vm-s", "", "public", T0 + h * W, T0 + (h + 1) * W): 100 + h
        for a in ACCOUNTS
        for h in range(8)
    }
    _fill(live, rng, shared)
    _fill(rebuilt, rng, shared)
    whole = differences(by_window(live.usage(0, FAR), through), by_window(rebuilt.usage(0, FAR), through))
    assert len(whole) > 50  # a non-trivial input: many differences, and many equal keys
    with live.read() as a, rebuilt.read() as b:
        streamed = merge_differences(window_totals(a, through), window_totals(b, through))
        assert streamed == whole
        totals = list(window_totals(a, through))
    assert [k for k, _ in totals] == sorted(k for k, _ in totals)  # code-point order on every store
    assert {k.account for k, _ in totals} == set(ACCOUNTS)
    with live.read() as a:
        assert merge_differences(window_totals(a, through), window_totals(a, through)) == []


def test_a_stream_out_of_order_is_refused() -> None:
    k1, k2 = WindowKey("a", 4, T0, T0 + W), WindowKey("b", 4, T0, T0 + W)
    with pytest.raises(ValueError, match="out of key order"):
        merge_differences([(k2, 1), (k1, 1)], [])
