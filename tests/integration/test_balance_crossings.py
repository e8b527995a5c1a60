"""One alert per crossing, from the store itself (migration 18): each crossing of an account is
numbered and (account, crossing) is unique among alerts, so two writers that both took the
same fall for theirs write one alert between them, on both stores; replicas evaluating at once
raise each crossing once; a store from before migration 18 is numbered in place, and one from
before migration 26 keeps the Idempotency-Key its alerts may have been POSTed with."""

from __future__ import annotations

import threading
import time
from decimal import Decimal

import sqlalchemy as sa

from kvmeter.collector.balance_watch import BalanceBook, idempotency_key
from kvmeter.collector.balances import Crossing, Thresholds, alert_key
from kvmeter.collector.store import Store
from kvmeter.collector.store import credits as stored
from tests.billing_support import ACCT_A, GB, Cloud, tariff

FALL = Crossing(ACCT_A, Decimal("4.00"), Decimal("5.00"), "EUR")


def alert_rows(store: Store) -> list[dict[str, object]]:
    with store.read() as conn:
        return [
            dict(r) for r in conn.execute(sa.text("SELECT account, crossing FROM balance_alerts")).mappings()
        ]


def test_two_writers_of_the_same_crossing_write_one_alert(store: Store) -> None:
    first_in, results = threading.Event(), {}

    def writer(name: str, hold_s: float) -> None:
        if name == "second":
            first_in.wait(10)
        with store.write() as conn:
            results[name] = stored.add_alerts(conn, [FALL], {ACCT_A: 1}, 1000, postgres=store.is_postgres)
            if name == "first":
                first_in.set()
                time.sleep(hold_s)  # the second writer's insert waits on this transaction

    threads = [threading.Thread(target=writer, args=(n, 0.5)) for n in ("first", "second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {"first": [FALL], "second": []}
    assert alert_rows(store) == [{"account": ACCT_A, "crossing": 1}]
    with store.write() as conn:  # the account's next crossing is another alert
        assert stored.add_alerts(conn, [FALL], {ACCT_A: 2}, 2000, postgres=store.is_postgres) == [FALL]
    assert len(alert_rows(store)) == 2


def test_replicas_evaluating_at_once_raise_each_crossing_once(store: Store) -> None:
    cloud = Cloud(store)
    replicas = [BalanceBook(store, tariff, Thresholds(Decimal("5.00"))) for _ in range(2)]
    raised: list[Crossing] = []
    lock = threading.Lock()

    def evaluate_together() -> None:
        start = threading.Barrier(len(replicas))

        def one(book: BalanceBook) -> None:
            start.wait(10)
            got = book.evaluate(cloud.now)
            with lock:
                raised.extend(got)

        threads = [threading.Thread(target=one, args=(b,)) for b in replicas]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)

    cloud.credit(ACCT_A, "10.00")
    spent = 0
    for round_ in range(3):  # fall below, evaluate at once twice, then a credit re-arms it
        cloud.send(ACCT_A, 6 * GB if round_ == 0 else 10 * GB)
        spent += 6 if round_ == 0 else 10
        evaluate_together()
        evaluate_together()
        assert len(raised) == round_ + 1
        cloud.credit(ACCT_A, "10.00")
        evaluate_together()  # 10 credited against 10 spent: at or above again, re-armed
    assert [x.account for x in raised] == [ACCT_A] * 3
    assert sorted(r["crossing"] for r in alert_rows(store)) == [1, 2, 3]
    assert spent == 26


def test_migration_18_numbers_crossings_of_an_older_store(store: Store) -> None:
    with store.write() as conn:
        conn.execute(sa.text("DROP INDEX ux_balance_alerts_crossing"))
        conn.execute(sa.text("ALTER TABLE balance_alerts DROP COLUMN crossing"))
        conn.execute(sa.text("ALTER TABLE balance_state DROP COLUMN crossings"))
        conn.execute(
            sa.text(
                "INSERT INTO balance_alerts (account, balance, threshold, currency, crossed_ms, attempts) "
                f"VALUES ('{ACCT_A}', '1', '5', 'EUR', 1, 0), ('{ACCT_A}', '2', '5', 'EUR', 2, 0)"
            )
        )  # two alerts raised before crossings were numbered
        conn.execute(
            sa.text(
                "INSERT INTO balance_state (account, below, balance, threshold, currency, evaluated_ms) "
                f"VALUES ('{ACCT_A}', false, '20', '5', 'EUR', 2)"
            )
        )
        conn.execute(sa.text("DELETE FROM schema_version WHERE version = 18"))
    store.migrate()
    assert sorted(r["crossing"] is None for r in alert_rows(store)) == [True, True]
    cloud = Cloud(store)
    cloud.credit(ACCT_A, "1.00")
    cloud.send(ACCT_A, 2 * GB)  # below 5.00
    [x] = BalanceBook(store, tariff, Thresholds(Decimal("5.00"))).evaluate(cloud.now)
    assert x.account == ACCT_A
    assert sorted((r["crossing"] or 0) for r in alert_rows(store)) == [0, 0, 1]


def test_migration_26_keeps_the_key_an_older_stores_alert_was_posted_with(store: Store) -> None:
    """An alert raised before migration 26 may have been POSTed already under
    kvmeter-balance-alert-<id>: it keeps that key (a receiver that has it recognises it), while
    an alert raised after the migration gets its own key, whatever its id."""
    with store.write() as conn:
        conn.execute(sa.text("ALTER TABLE balance_alerts DROP COLUMN idempotency_key"))
        conn.execute(sa.text("ALTER TABLE balance_alerts DROP COLUMN tried_ms"))
        conn.execute(
            sa.text(
                "INSERT INTO balance_alerts (account, balance, threshold, currency, crossed_ms, attempts, "
                f"crossing) VALUES ('{ACCT_A}', '1', '5', 'EUR', 1, 3, 1)"
            )
        )  # an alert tried three times before the upgrade
        conn.execute(sa.text("DELETE FROM schema_version WHERE version = 26"))
    store.migrate()
    with store.write() as conn:
        stored.add_alerts(conn, [Crossing(ACCT_A, Decimal("1"), Decimal("5"), "EUR")], {ACCT_A: 2}, 2,
                          postgres=store.is_postgres)  # fmt: skip
        old, new = stored.alerts(conn, None)
    assert idempotency_key(old) == f"kvmeter-balance-alert-{old['id']}"
    assert idempotency_key(new) == alert_key(ACCT_A, 2, 2) != f"kvmeter-balance-alert-{new['id']}"
