"""Balances from the store, the periodic evaluation that raises low-balance alerts, and their
webhook delivery.

    BalanceBook(store, tariff, thresholds).balances(accounts, now_ms) -> [Balance]
    BalanceBook.evaluate(now_ms) -> [Crossing]      state change and outbox row, one transaction
    AlertWebhook(url).deliver(store, now_ms)         POST each undelivered alert, tenacity backoff;
                                                     new alerts first, then the least recently tried
    BalanceWatcher(book, webhook, ...).start()       both, every period: evaluations and deliveries
                                                     on threads of their own

Watched accounts are those with credits; an account's costs are summed over every month from the
one of its first credit through now (balance_costs: closed months kept while unchanged). Nothing
here can stop metering: an evaluation or a delivery that fails is logged and tried again at the next period.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from decimal import Decimal

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector as PromCollector
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from kvmeter.collector import balances as core
from kvmeter.collector.balance_costs import CostsSince
from kvmeter.collector.billing import Tariff
from kvmeter.collector.config_balances import BalancesConfig
from kvmeter.collector.http_deadline import Rejected, post_status, refuses_item
from kvmeter.collector.metrics import Metrics
from kvmeter.collector.store import Store
from kvmeter.collector.store import credits as stored

log = logging.getLogger(__name__)

WEBHOOK_ATTEMPTS = 5  # per delivery round; an alert still undelivered waits for the next round


def _now_ms() -> int:
    return int(time.time() * 1000)


class BalanceBook:
    """Credits minus costs, under the tariff in force (tariff() None: no costs, no balances)."""

    def __init__(self, store: Store, tariff: Callable[[], Tariff | None], thresholds: core.Thresholds):
        self.store = store
        self.tariff = tariff
        self.thresholds = thresholds
        self.costs = CostsSince(store)  # closed months kept, the current one rated incrementally
        self._costs_lock = threading.Lock()

    def balances(self, accounts: frozenset[str] | None, now_ms: int) -> list[core.Balance]:
        """The balances of these accounts (None: all) that have credits, by account."""
        return self.read(accounts, now_ms)[0]

    def read(self, accounts: frozenset[str] | None, now_ms: int) -> tuple[list[core.Balance], dict[str, str]]:
        """(the balances, {account: why it has none}): an account with credits has no balance
        when they are in two currencies, or not in the tariff's (its currency changed); never
        one that leaves some of its credits out."""
        tariff = self.tariff()
        if tariff is None:
            return [], {}
        with self.store.read() as conn:
            sums = stored.credit_sums(conn, accounts)
        refused: dict[str, str] = {}
        usable: dict[str, tuple[Decimal, int]] = {}
        for account, by_currency in sums.items():
            held = core.currencies(by_currency)
            if len(held) > 1:
                refused[account] = core.mixed_error(account, held)
            elif held and held[0] != tariff.currency:
                refused[account] = (
                    f"account {account} holds credits in {held[0]}, the tariff is in {tariff.currency}"
                )
            else:  # none held (all reversed): no money, in the tariff's currency as in any other
                amount = by_currency[held[0]][0] if held else Decimal(0)
                usable[account] = (amount, core.first_ms(by_currency))
        for why in refused.values():
            log.warning("no balance: %s", why)
        with self._costs_lock:
            costs = self.costs.costs(tariff, {a: first_ms for a, (_, first_ms) in usable.items()}, now_ms)
        found = [
            core.Balance(a, tariff.currency, amount, costs[a], self.thresholds.of(a))
            for a, (amount, _) in sorted(usable.items())
        ]
        return found, refused

    def evaluate(self, now_ms: int) -> list[core.Crossing]:
        """Every watched account's balance against its threshold: the new crossings, stored with
        the new state in one transaction (once per crossing, whichever replica evaluates).

        The balances are computed before the state is locked (rating takes a while), so another
        replica may have stored a newer evaluation meanwhile: an account whose stored state is
        newer than `now_ms` keeps it (this one's view is older; writing it would re-arm a
        crossing, or raise one, that the newer view does not see). Accounts no longer watched
        (their threshold removed, their credits not in the tariff's currency, or in two) are not below
        anything any more."""
        # No tariff, nothing rated: no balance is known, and none is "not below" (unwatching them
        # all would re-arm every crossing: a second alert for the same fall once rated again).
        if self.tariff() is None:
            return []
        computed = self.balances(None, now_ms)
        watched = [b for b in computed if b.threshold is not None]
        postgres = self.store.is_postgres
        with self.store.write() as conn:  # its own short transaction: no lock held with the states'
            stored.unwatch(conn, [b.account for b in watched], now_ms)
        with self.store.write() as conn:
            before = stored.lock_states(conn, [b.account for b in watched], postgres=postgres)
            watched = [b for b in watched if before.get(b.account, (False, 0, 0))[2] <= now_ms]
            raised = core.crossings(watched, {a: below for a, (below, _, _) in before.items()})
            numbers = {a: n for a, (_, n, _) in before.items()}
            numbers.update({x.account: numbers.get(x.account, 0) + 1 for x in raised})
            stored.save_states(conn, watched, now_ms, numbers, postgres=postgres)
            raised = stored.add_alerts(conn, raised, numbers, now_ms, postgres=postgres)
        for x in raised:
            log.warning("balance of %s is %s %s, below its threshold %s", x.account, x.balance, x.currency,
                        x.threshold)  # fmt: skip
        return raised


def alert_body(alert: dict[str, object]) -> dict[str, object]:
    crossed = dt.datetime.fromtimestamp(int(alert["crossed_ms"]) / 1000, dt.UTC)  # type: ignore[call-overload]
    return {
        "id": alert["id"],
        "event": "balance.below_threshold",
        "account": alert["account"],
        "balance": alert["balance"],
        "threshold": alert["threshold"],
        "currency": alert["currency"],
        "crossed_at": crossed.isoformat().replace("+00:00", "Z"),
    }


def idempotency_key(alert: Mapping[str, object]) -> str:
    """The alert's key as stored (balances.alert_key); one raised before migration 26 keeps the
    key it may have been POSTed with already, of its id."""
    return str(alert.get("idempotency_key") or f"kvmeter-balance-alert-{alert['id']}")


class AlertWebhook:
    """POSTs each undelivered alert as JSON with its `Idempotency-Key` (a receiver deduplicates
    by it: a replica may deliver an alert another already did); any 2xx is an acknowledgement.
    Retried with exponential backoff (tenacity); each POST is over within timeout_s whatever the
    receiver does. As the hand-off's webhook: an alert the receiver refuses (a 4xx about it) is
    not retried in its round, an alert still not acknowledged after its attempts ends the round,
    and a round takes the alerts never tried first, then those tried least recently, so alerts
    refused for good, or failing, never keep the others waiting."""

    def __init__(self, url: str, *, timeout_s: float = 10.0, attempts: int = WEBHOOK_ATTEMPTS,
                 backoff_s: float = 0.5, max_wait_s: float = 30.0):  # fmt: skip
        self.url = url
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.max_wait_s = max_wait_s

    def _post(self, body: dict[str, object], key: str) -> None:
        request = urllib.request.Request(
            self.url,
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json", "Idempotency-Key": key},
        )
        try:  # within timeout_s in all (a trickled answer too); a 3xx, not a 2xx, is not followed
            status = post_status(request, self.timeout_s)
        except (http.client.HTTPException, ValueError) as exc:  # an answer that is not HTTP
            raise OSError(f"webhook answered no HTTP: {type(exc).__name__}: {exc}") from None
        if refuses_item(status):
            raise Rejected(f"webhook refused it: {status}")
        if not 200 <= status < 300:
            raise OSError(f"webhook answered {status}")

    def deliver(self, store: Store, now_ms: Callable[[], int] = _now_ms) -> tuple[int, int]:
        """(delivered, failed) of the alerts undelivered so far."""
        with store.read() as conn:
            pending = stored.undelivered(conn)
        delivered = failed = 0
        for alert in pending:
            body, key = alert_body(alert), idempotency_key(alert)
            retrying = Retrying(
                stop=stop_after_attempt(self.attempts),
                wait=wait_exponential(multiplier=self.backoff_s, max=self.max_wait_s),
                retry=retry_if_exception_type((OSError, urllib.error.URLError)),
                reraise=True,
            )
            tries = 0
            try:
                for attempt in retrying:
                    with attempt:
                        tries += 1
                        self._post(body, key)
            except (OSError, Rejected) as exc:  # tried again next round, behind the others
                failed += 1
                log.warning("balance alert %s not delivered after %d attempt(s): %s", alert["id"], tries, exc)
                with store.write() as conn:
                    stored.count_attempts(conn, {int(alert["id"]): tries}, now_ms())
                if isinstance(exc, Rejected):  # about this alert: the others go on
                    continue
                # The receiver is down or failing: the rest wait for the next round, as the
                # hand-off's do (each tried with backoff, a round of 100 held a new alert, and
                # the receiver, for 100 x 7.5 s and more). This one goes behind them.
                break
            delivered += 1
            with store.write() as conn:
                stored.mark_delivered(conn, int(alert["id"]), now_ms())
                stored.count_attempts(conn, {int(alert["id"]): tries}, now_ms())
        return delivered, failed


class BalanceGauges(PromCollector):
    """From the store on each scrape (every replica reports the shared truth): each watched
    account's balance at the last evaluation and whether it is below its threshold."""

    def __init__(self, store: Store):
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            with self.store.read() as conn:
                rows = stored.states(conn)
        except Exception as exc:  # a scrape must not fail because the database is down
            log.warning("balance gauges unavailable: %s", exc)
            return
        below = GaugeMetricFamily(
            "kvmeter_balance_below_threshold", "1 while the account's balance is below its threshold",
            labels=["account"],
        )  # fmt: skip
        balance = GaugeMetricFamily(
            "kvmeter_balance", "Credits minus costs at the last evaluation", labels=["account", "currency"]
        )
        for row in rows:
            below.add_metric([row["account"]], 1.0 if row["below"] else 0.0)
            balance.add_metric([row["account"], row["currency"]], float(Decimal(row["balance"])))
        yield below
        yield balance


class BalanceWatcher:
    """Evaluates every `period_s` and delivers the alerts; counts them in Prometheus. Started,
    the deliveries run on a thread of their own, woken by new alerts: a receiver that is down
    (each alert retried with backoff, up to the timeout per attempt) never holds up the next
    evaluation."""

    def __init__(self, book: BalanceBook, webhook: AlertWebhook | None, alerts: Counter, failures: Counter,
                 *, period_s: float = 60.0, clock: Callable[[], int] = _now_ms):  # fmt: skip
        self.book = book
        self.webhook = webhook
        self.alerts = alerts
        self.failures = failures
        self.period_s = period_s
        self.clock = clock
        self._wake = threading.Event()  # new alerts to deliver

    def evaluate(self) -> list[core.Crossing]:
        raised = self.book.evaluate(self.clock())
        for x in raised:
            self.alerts.labels(x.account).inc()
        if raised:
            self._wake.set()
        return raised

    def deliver(self) -> None:
        if self.webhook is not None:
            _, failed = self.webhook.deliver(self.book.store, self.clock)
            self.failures.inc(failed)

    def once(self) -> list[core.Crossing]:
        raised = self.evaluate()
        self.deliver()
        return raised

    def run(self, stop: threading.Event) -> None:
        """The evaluations, every period."""
        while not stop.is_set():
            try:
                self.evaluate()
            except Exception:  # never the pipeline's problem: logged, tried again next period
                log.exception("balance evaluation failed")
            stop.wait(self.period_s)

    def run_deliveries(self, stop: threading.Event) -> None:
        """The webhook's rounds: every period, and as soon as an evaluation raised alerts."""
        while not stop.is_set():
            self._wake.clear()
            try:
                self.deliver()
            except Exception:  # logged, tried again next round
                log.exception("balance alert delivery failed")
            self._wake.wait(self.period_s)

    def start(self) -> threading.Event:
        stop = threading.Event()
        threading.Thread(target=self.run, args=(stop,), name="balances", daemon=True).start()
        if self.webhook is not None:
            deliveries = threading.Thread(target=self.run_deliveries, args=(stop,), name="balance-alerts")
            deliveries.daemon = True
            deliveries.start()
        return stop


def book_for(
    section: BalancesConfig | None, store: Store, tariff: Callable[[], Tariff | None]
) -> BalanceBook:
    """The daemons' book: what /v1/balances answers from, with the [balances] thresholds."""
    return BalanceBook(store, tariff, section.thresholds if section is not None else core.Thresholds())


def watch(section: BalancesConfig | None, book: BalanceBook, metrics: Metrics) -> threading.Event | None:
    """With a [balances] section: the watcher's thread started (set the event to stop it) and
    the store's balance gauges on /metrics; without one, nothing."""
    if section is None:
        return None
    webhook = None
    if section.webhook_url:
        webhook = AlertWebhook(section.webhook_url, timeout_s=section.webhook_timeout_s)
    metrics.registry.register(BalanceGauges(book.store))
    counters = (metrics.balance_alerts, metrics.balance_webhook_failures)
    log.info("balances: evaluated every %g s, default threshold %s, %d account threshold(s)%s",
             section.evaluate_s, book.thresholds.default, len(book.thresholds.accounts),
             f", alerts to {section.webhook_url}" if webhook else "")  # fmt: skip
    return BalanceWatcher(book, webhook, *counters, period_s=section.evaluate_s).start()
