"""Credits, balances and low-balance alerts on both stores: balance = credits - costs (rated from
real usage records by billing's tariff); a crossing raises one alert (not one per evaluation,
whichever replica evaluates), a credit re-arms it, the webhook gets each alert once it
acknowledges, and metering goes on below the threshold."""

from __future__ import annotations

import http.server
import json
from collections.abc import Iterator
from decimal import Decimal
from typing import ClassVar

import pytest
from prometheus_client import CollectorRegistry, Counter

from kvmeter.collector.balance_watch import (
    AlertWebhook,
    BalanceBook,
    BalanceGauges,
    BalanceWatcher,
    idempotency_key,
)
from kvmeter.collector.balances import Thresholds
from kvmeter.collector.store import Store
from kvmeter.collector.store import credits as stored
from tests.billing_support import ACCT_A, ACCT_B, GB, Cloud, tariff
from tests.harness.http_receiver import serving


@pytest.fixture
def cloud(store: Store) -> Cloud:
    return Cloud(store)


def book(store: Store, default: str | None = "5.00", **own: str) -> BalanceBook:
    thresholds = Thresholds(
        None if default is None else Decimal(default), {a: Decimal(v) for a, v in own.items()}
    )
    return BalanceBook(store, tariff, thresholds)


def alert_rows(store: Store) -> list[dict[str, object]]:
    with store.read() as conn:
        return stored.alerts(conn, None)


def test_balance_is_credits_minus_costs_from_usage(cloud: Cloud) -> None:
    cloud.credit(ACCT_A, "10.00")
    cloud.credit(ACCT_A, "2.50")
    cloud.send(ACCT_A, 3 * GB)
    cloud.send(ACCT_B, 7 * GB)  # no credits: not watched, no balance
    [a] = book(cloud.store).balances(None, cloud.now)
    assert (a.account, a.currency) == (ACCT_A, "EUR")
    assert (a.credits, a.costs, a.balance) == (Decimal("12.50"), Decimal("3.00"), Decimal("9.50"))
    assert book(cloud.store).balances(frozenset({ACCT_B}), cloud.now) == []


def test_crossing_alerts_once_rearms_after_a_credit_and_metering_goes_on(cloud: Cloud) -> None:
    cloud.credit(ACCT_A, "10.00")
    replica_1, replica_2 = book(cloud.store), book(cloud.store)
    assert replica_1.evaluate(cloud.now) == []  # 10.00 >= 5.00
    cloud.send(ACCT_A, 6 * GB)  # 4.00: below
    [crossing] = replica_1.evaluate(cloud.now)
    assert (crossing.account, crossing.balance, crossing.threshold) == (
        ACCT_A,
        Decimal("4.00"),
        Decimal("5.00"),
    )
    # Every later evaluation, on either replica, sees the same crossing: no new alert.
    assert replica_2.evaluate(cloud.now) == []
    assert replica_1.evaluate(cloud.now) == []
    cloud.send(ACCT_A, 2 * GB)  # metering goes on below the threshold: 2.00 now, still no alert
    assert replica_2.evaluate(cloud.now) == []
    assert replica_1.balances(None, cloud.now)[0].balance == Decimal("2.00")
    assert len(alert_rows(cloud.store)) == 1
    cloud.credit(ACCT_A, "20.00")  # 22.00: re-armed
    assert replica_2.evaluate(cloud.now) == []
    cloud.send(ACCT_A, 18 * GB)  # 4.00: a new crossing
    [again] = replica_2.evaluate(cloud.now)
    assert again.balance == Decimal("4.00")
    assert [r["balance"] for r in alert_rows(cloud.store)] == ["4.00", "4.00"]
    assert replica_1.evaluate(cloud.now) == []


def test_thresholds_per_account_over_the_default(cloud: Cloud) -> None:
    cloud.credit(ACCT_A, "10.00")
    cloud.credit(ACCT_B, "10.00")
    cloud.send(ACCT_A, 3 * GB)
    cloud.send(ACCT_B, 3 * GB)  # both at 7.00
    raised = book(cloud.store, "5.00", **{ACCT_B: "8.00"}).evaluate(cloud.now)
    assert [x.account for x in raised] == [ACCT_B]
    assert book(cloud.store, None).evaluate(cloud.now) == []  # no default: A is not watched


class Receiver(http.server.BaseHTTPRequestHandler):
    fail_first = 2
    seen: ClassVar[list[tuple[str, dict[str, object]]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Receiver.seen.append((self.headers["Idempotency-Key"], body))
        status = 503 if len(Receiver.seen) <= Receiver.fail_first else 204
        self.send_response(status)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[str]:
    Receiver.seen = []
    with serving(Receiver) as url:
        yield url


def test_webhook_retried_with_backoff_until_acknowledged_then_never_again(
    cloud: Cloud, receiver: str
) -> None:
    cloud.credit(ACCT_A, "10.00")
    cloud.send(ACCT_A, 9 * GB)
    registry = CollectorRegistry()
    alerts = Counter("kvmeter_balance_alerts", "", ["account"], registry=registry)
    failures = Counter("kvmeter_balance_webhook_failures", "", registry=registry)
    hook = AlertWebhook(receiver, backoff_s=0.01, max_wait_s=0.05)
    watcher = BalanceWatcher(book(cloud.store), hook, alerts, failures, clock=lambda: cloud.now)
    assert len(watcher.once()) == 1
    assert len(watcher.once()) == 0
    assert registry.get_sample_value("kvmeter_balance_alerts_total", {"account": ACCT_A}) == 1
    assert registry.get_sample_value("kvmeter_balance_webhook_failures_total") == 0
    # Failed twice (503), acknowledged the third time; the next round sends nothing.
    assert len(Receiver.seen) == 3
    [row] = alert_rows(cloud.store)
    assert {key for key, _ in Receiver.seen} == {idempotency_key(row)}
    body = Receiver.seen[-1][1]
    assert body["event"] == "balance.below_threshold"
    assert (body["account"], body["balance"], body["threshold"], body["currency"]) == (
        ACCT_A,
        "1.00",
        "5.00",
        "EUR",
    )
    assert row["delivered_ms"] is not None


def test_webhook_down_keeps_the_alert_for_the_next_round(cloud: Cloud, receiver: str) -> None:
    cloud.credit(ACCT_A, "1.00")
    Receiver.fail_first = 100
    try:
        hook = AlertWebhook(receiver, attempts=2, backoff_s=0.01, max_wait_s=0.02)
        book(cloud.store).evaluate(cloud.now)
        assert hook.deliver(cloud.store) == (0, 1)
        assert len(Receiver.seen) == 2
        Receiver.fail_first = 0
        assert hook.deliver(cloud.store) == (1, 0)
        assert hook.deliver(cloud.store) == (0, 0)
    finally:
        Receiver.fail_first = 2


def test_gauges_report_the_stores_state(cloud: Cloud) -> None:
    cloud.credit(ACCT_A, "10.00")
    cloud.credit(ACCT_B, "10.00")
    cloud.send(ACCT_A, 8 * GB)
    book(cloud.store).evaluate(cloud.now)
    registry = CollectorRegistry()
    registry.register(BalanceGauges(cloud.store))
    assert registry.get_sample_value("kvmeter_balance_below_threshold", {"account": ACCT_A}) == 1
    assert registry.get_sample_value("kvmeter_balance_below_threshold", {"account": ACCT_B}) == 0
    assert registry.get_sample_value("kvmeter_balance", {"account": ACCT_A, "currency": "EUR"}) == 2.0
