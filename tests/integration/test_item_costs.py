"""Each billable item carries its cost (both databases): rated as /v1/costs rates (a price
change inside a window, a byte tier crossed inside one, rounding by the one rule), in the order
the items are made; an account's items of a month, summed, are its month's cost to the last
digit once every window is final, however records and adjustments interleaved."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa

from kvmeter.collector.billing import months_costs, tariff_file
from kvmeter.collector.billing.rating import Facts
from kvmeter.collector.model import Record, Settings, UsageKey
from kvmeter.collector.rebuild import rebuild
from kvmeter.collector.schema import handoff_outbox
from kvmeter.collector.store import Store
from kvmeter.collector.store.item_costs import tariff_identity
from tests.collector_support import ACCT_A, ACCT_B, HOUR, IP1, MIN, T0, VM1, VM2, M, Stream, usage_event
from tests.harness import postgres
from tests.integration.test_outbox_store import _run


def _at(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


TARIFF = {
    "currency": "EUR",
    "decimals": 2,
    "rate": [  # a price change 10 minutes into a window; bytes cross a tier inside one
        {"usage_type": "RUNNING_VM", "per_hour": "0.37", "until": _at(T0 + HOUR + 10 * MIN)},
        {"usage_type": "RUNNING_VM", "per_hour": "0.41", "from": _at(T0 + HOUR + 10 * MIN)},
        {"usage_type": "ALLOCATED_VM", "per_hour": "0.013"},
        {"usage_type": "IP_ADDRESS", "per_hour": "0.007"},
        {
            "usage_type": "NETWORK_BYTES_SENT",
            "traffic_type": "public",
            "unit": "B",
            "tiers": [{"up_to": 1500, "price": "0.0003"}, {"price": "0.0001"}],
        },
        {"usage_type": "NETWORK_BYTES_RECEIVED", "traffic_type": "public", "unit": "kB", "price": "0.0011"},
    ],
}


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.pg)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/a.db"
        return
    yield postgres.create_database(str(request.getfixturevalue("pg_dsn")))


def items(store: Store) -> list[dict]:  # type: ignore[type-arg]
    with store.read() as conn:
        rows = conn.execute(sa.select(handoff_outbox.c.item).order_by(handoff_outbox.c.id)).scalars()
        return [json.loads(r) for r in rows]


def test_items_of_a_month_sum_to_its_cost_to_the_last_digit(url: str) -> None:
    tariff = tariff_file.from_dict(TARIFF, "test tariff", billable=["public"])
    store = Store(url, outbox=True)
    store.migrate()
    store.pricing = lambda _conn: (tariff, Facts())
    collector = _run(store)  # records final, late bytes and a late stop as adjustments
    # More late changes to final windows, interleaved with the finalization of later ones.
    for event in (
        usage_event("VM.DESTROY", VM2, ACCT_B, T0 + 2 * HOUR + 5 * MIN),
        usage_event("NET.IPRELEASE", IP1, ACCT_A, T0 + 3 * HOUR + 20 * MIN),
        usage_event("VM.DESTROY", VM1, ACCT_A, T0 + 4 * HOUR),
    ):
        collector.apply_event(event[1], event[0])
    late = Stream("stream-later", "h8")
    collector.apply_batches([Record(late.batch([M(T0 + 2 * MIN, T0 + 3 * MIN, 777_777)]))])
    collector.clock.now = T0 + 9 * HOUR  # type: ignore[attr-defined]
    collector.tick()
    assert all(r.final for r in store.usage(0, 2**62)), "every window final"

    handed = items(store)
    kinds = {(i["kind"], i["usage_type"]) for i in handed}
    assert {("adjustment", 1), ("adjustment", 4), ("adjustment", 3), ("record", 2)} <= kinds
    sums: dict[str, Decimal] = defaultdict(Decimal)
    for item in handed:
        cost = item["cost"]
        assert (cost["currency"], cost["tariff"]) == ("EUR", tariff_identity(tariff))
        assert cost["rates"], item
        assert Decimal(cost["amount"]).as_tuple().exponent >= -2  # the tariff's decimals
        sums[item["account"]] += Decimal(cost["amount"])
    costs = {m.account: m.cost for m in months_costs(store, tariff, None, T0 + 9 * HOUR)}
    assert set(costs) == {ACCT_A, ACCT_B}
    assert all(costs.values())
    assert dict(sums) == costs
    # The price change inside a window and the tier crossed inside one were both met.
    assert {r for i in handed for r in i["cost"]["rates"]} >= {"rate.0", "rate.1", "rate.4"}
    store.close()


def test_without_a_tariff_items_carry_no_cost(url: str) -> None:
    store = Store(url, outbox=True)
    store.migrate()
    _run(store)
    handed = items(store)
    assert handed
    assert not any("cost" in i for i in handed)
    store.close()


def test_a_rebuilt_store_prices_its_next_items_as_the_live_store_would(url: str, tmp_path: Path) -> None:
    tariff = tariff_file.from_dict(TARIFF, "test tariff", billable=["public"])
    live = Store(url, outbox=True)
    live.migrate()
    live.pricing = lambda _conn: (tariff, Facts())
    _run(live)
    into_url = f"sqlite:///{tmp_path}/rebuilt.db"
    into = Store(into_url)
    into.migrate()
    rebuild(Settings(), None, live, into, lambda: T0 + 7 * HOUR)  # fills no outbox
    into.close()
    into = Store(into_url, outbox=True)  # put in service with [handoff] and the tariff
    into.pricing = lambda _conn: (tariff, Facts())
    late = UsageKey(ACCT_A, 4, VM1, "", "public", T0 + HOUR, T0 + 2 * HOUR)
    for store in (live, into):
        with store.write() as conn:
            store.add_bytes(conn, {late: 1234}, {}, store.finalized_through(conn), T0 + 8 * HOUR)
    (mine,), (theirs,) = (
        [i for i in items(s) if i["made_ms"] == T0 + 8 * HOUR] for s in (live, into)
    )  # fmt: skip
    assert mine["transaction_id"] == theirs["transaction_id"]  # the versions carried over
    assert mine["cost"] == theirs["cost"]  # the running total and tiers carried over
    # Past the tier (0.0001 a byte, 0.1234 exact) and a step of the carried rounded total; a
    # store starting the month afresh would price the bytes at the first tier (0.37).
    assert Decimal(mine["cost"]["amount"]) == Decimal("0.13")
    live.close()
    into.close()


@pytest.mark.pg
def test_two_writers_on_postgresql_price_one_accounts_items_in_turn(pg_database: str) -> None:
    """Two replicas adjust the same accounts at once, several keys per transaction: the month's
    running total is locked per account, so the items still sum to the month's cost, and no
    transaction deadlocks."""
    tariff = tariff_file.from_dict(TARIFF, "test tariff", billable=["public"])
    writers = [Store(pg_database, outbox=True) for _ in range(2)]
    writers[0].migrate()
    for w in writers:
        w.pricing = lambda _conn: (tariff, Facts())
    with writers[0].write() as conn:
        writers[0].finalize(conn, T0 + 24 * HOUR, 1)
    errors: list[BaseException] = []

    def write(n: int, store: Store) -> None:
        try:
            for i in range(30):
                keys = [
                    UsageKey(
                        account,
                        4,
                        VM1,
                        "",
                        "public",
                        T0 + ((i + j) % 24) * HOUR,
                        T0 + ((i + j) % 24 + 1) * HOUR,
                    )
                    for j, account in enumerate((ACCT_A, ACCT_B)[:: 1 if n else -1])
                ]
                with store.write() as conn:
                    store.add_bytes(conn, {k: 97 * (i + 1) + n for k in keys}, {}, T0 + 24 * HOUR, 10 + i)
                    time.sleep(0.003)  # hold the locks a while
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n, s)) for n, s in enumerate(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    handed = items(writers[0])
    assert len(handed) == 2 * 30 * 2
    sums: dict[str, Decimal] = defaultdict(Decimal)
    for item in handed:
        sums[item["account"]] += Decimal(item["cost"]["amount"])
    costs = {m.account: m.cost for m in months_costs(writers[0], tariff, None, T0 + 24 * HOUR)}
    assert dict(sums) == costs
    assert all(costs.values())
    for w in writers:
        w.close()
