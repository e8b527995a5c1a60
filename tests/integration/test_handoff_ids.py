"""Transaction ids are never given twice (both databases): a (key, version) pair names one
content for good, through retention pruning the records of a window and through a rebuild that
starts a new store. A later change to such a window continues after the last version given."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from kvmeter.collector import billable
from kvmeter.collector.model import RUNNING_VM, Settings, UsageKey
from kvmeter.collector.prune import Pruner
from kvmeter.collector.rebuild import rebuild
from kvmeter.collector.retention import DAY_MS, RetentionPolicy
from kvmeter.collector.schema import TIME_TYPES, handoff_outbox
from kvmeter.collector.schema_versions import record_versions
from kvmeter.collector.store import Store
from tests.collector_support import ACCT_A, ACCT_B, HOUR, T0, VM1, VM2
from tests.harness import postgres
from tests.integration.test_outbox_store import _run


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.pg)])
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/b.db"
        return
    dsn = str(request.getfixturevalue("pg_dsn"))
    yield postgres.create_database(dsn), postgres.create_database(dsn)


def opened(url: str, *, outbox: bool = True) -> Store:
    store = Store(url, outbox=outbox)
    store.migrate()
    return store


def items(store: Store) -> list[dict]:  # type: ignore[type-arg]
    with store.read() as conn:
        rows = conn.execute(sa.select(handoff_outbox.c.item).order_by(handoff_outbox.c.id)).scalars()
        return [json.loads(r) for r in rows]


def key(start: int = T0, account: str = ACCT_A) -> UsageKey:
    return UsageKey(account, 4, VM1, "", "public", start, start + HOUR)


def late_bytes(store: Store, increments: dict[UsageKey, int], now: int) -> None:
    with store.write() as conn:
        store.add_bytes(conn, increments, {}, store.finalized_through(conn), now)


def test_a_pruned_window_changed_later_continues_after_its_last_version(urls: tuple[str, str]) -> None:
    store = opened(urls[0])
    adjusted, plain = key(), key(account=ACCT_B)
    late_bytes(store, {adjusted: 100, plain: 40}, 1)
    with store.write() as conn:
        store.finalize(conn, T0 + HOUR, 2)
    late_bytes(store, {adjusted: 7}, 3)
    late_bytes(store, {adjusted: -2}, 4)  # versions 0, 1, 2 handed off for `adjusted`
    now = T0 + 40 * DAY_MS
    counts = Pruner(store, RetentionPolicy(usage_ms=30 * DAY_MS, lifecycle_events_ms=30 * DAY_MS,
                                           parked_measures_ms=30 * DAY_MS), lambda: now).run()  # fmt: skip
    assert (counts["usage_records"], counts["usage_adjustments"]) == (2, 2)
    assert store.usage(T0, T0 + HOUR) == []
    with store.read() as conn:  # only the adjusted record needs its version kept
        kept = conn.execute(sa.select(record_versions.c.resource, record_versions.c.version)).all()
    assert [tuple(r) for r in kept] == [(VM1, 2)]

    # The same windows change again (a dead letter redriven after all that time).
    late_bytes(store, {adjusted: 5, plain: 9}, now)
    got = {(a.key, a.version) for a in store.adjustments(0)}
    assert got == {(adjusted, 3), (plain, 1)}
    handed = items(store)
    ids = [i["transaction_id"] for i in handed]
    assert len(ids) == len(set(ids)) == 6, "every item its own id, none given twice"
    assert ids[-2:] == [billable.transaction_id(adjusted, 3), billable.transaction_id(plain, 1)]
    assert [(i["version"], i["quantity"]) for i in handed if i["account"] == ACCT_A] == [
        (0, 100), (1, 7), (2, -2), (3, 5)
    ]  # fmt: skip

    # Pruned again: the kept version only grows (the recreated record was at 3).
    Pruner(store, RetentionPolicy(usage_ms=DAY_MS, lifecycle_events_ms=DAY_MS, parked_measures_ms=DAY_MS),
           lambda: now + 2 * DAY_MS).run()  # fmt: skip
    late_bytes(store, {adjusted: 1}, now + 2 * DAY_MS)
    assert items(store)[-1]["transaction_id"] == billable.transaction_id(adjusted, 4)
    store.close()


def test_a_rebuilt_store_continues_after_the_live_stores_versions(urls: tuple[str, str]) -> None:
    live, into = opened(urls[0]), opened(urls[1], outbox=False)
    _run(live)  # late bytes adjust VM1's bytes, a late stop adjusts VM2's running time
    given = {(a.key, a.version) for a in live.adjustments(0)}
    last = {k: max(v for kk, v in given if kk == k) for k, _ in given}
    byte = next(k for k in last if k.usage_type == 4)

    done = rebuild(Settings(), None, live, into, lambda: T0 + 7 * HOUR)  # raw events only
    assert done.carried_versions == len(last)
    rebuilt = {r.key: r for r in into.usage(0, 2**62)}
    stopped = sorted(k for k in last if k.usage_type == RUNNING_VM and k.resource == VM2)
    # The late stop is folded into the rebuilt records: the stop's window at version 0, the
    # windows after it not there at all (zero).
    running, *after = stopped
    assert (rebuilt[running].final, rebuilt[running].adjustment) == (True, 0)
    assert after
    assert not set(after) & set(rebuilt)

    with into.write() as conn:  # the same windows change again in the rebuilt store
        into.lock_resources(conn, [VM2])
        through = into.finalized_through(conn)
        wanted = {
            k: r.quantity for k, r in rebuilt.items() if k.usage_type in TIME_TYPES and k.resource == VM2
        }
        wanted |= {running: rebuilt[running].quantity - 1000, after[0]: 60_000}
        into.set_time_values_many(conn, {VM2: wanted}, through, T0 + 8 * HOUR)
        into.add_bytes(conn, {byte: 3}, {}, through, T0 + 8 * HOUR)
    made = {(a.key, a.version) for a in into.adjustments(0)}
    assert made == {(k, last[k] + 1) for k in (running, after[0], byte)}
    assert not {billable.transaction_id(k, v) for k, v in made} & {
        billable.transaction_id(k, v) for k, v in given
    }
    live.close()
    into.close()


def test_migration_19_adds_the_kept_versions_to_an_older_store(urls: tuple[str, str]) -> None:
    store = opened(urls[0])
    with store.write() as conn:
        conn.execute(sa.text("DROP TABLE record_versions"))
        conn.execute(sa.text("DROP TABLE handoff_item_costs"))
        conn.execute(sa.text("DELETE FROM schema_version WHERE version = 19"))
    assert store.migrate() >= 19
    with store.read() as conn:
        assert sa.inspect(conn).has_table("record_versions")
        assert sa.inspect(conn).has_table("handoff_item_costs")
    store.close()
