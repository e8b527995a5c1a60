"""Credits, balances and low-balance alerts at their edges, through the real BalanceBook, the
watcher as the daemons start it, the CLI and `rebuild`, on SQLite and PostgreSQL: a replica's
stale evaluation raises no second alert for one fall, an account no longer watched is not below
for ever and alerts again on a new fall when watched again, a receiver that is down does not hold
up the evaluations, a rebuild keeps the credits and the alerts' ids, the CLI refuses a note the
store cannot keep."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from kvmeter.cli import main
from kvmeter.collector import balance_watch
from kvmeter.collector.balance_watch import BalanceBook, BalanceGauges
from kvmeter.collector.balances import Crossing, Thresholds
from kvmeter.collector.config_balances import BalancesConfig
from kvmeter.collector.metrics import Metrics
from kvmeter.collector.model import Settings
from kvmeter.collector.rebuild import rebuild
from kvmeter.collector.schema_credits import credits as credits_table
from kvmeter.collector.store import Store
from kvmeter.collector.store import credits as stored
from tests.billing_support import ACCT_A, ACCT_B, GB, Cloud, tariff
from tests.harness import postgres
from tests.harness.http_receiver import serving


def alert_rows(s: Store) -> list[dict[str, Any]]:
    with s.read() as conn:
        return stored.alerts(conn, None)


def below_gauge(s: Store, account: str) -> float | None:
    registry = CollectorRegistry()
    registry.register(BalanceGauges(s))
    return registry.get_sample_value("kvmeter_balance_below_threshold", {"account": account})


def test_a_slow_replicas_stale_evaluation_does_not_raise_a_second_alert_for_one_fall(
    store: Store,
) -> None:
    """A replica computes the balances before it locks the states (rating takes a while):
    an evaluation older than the state another replica stored meanwhile is not written (it
    re-armed the crossing, and the next evaluation raised a second alert for one fall)."""
    cloud = Cloud(store)
    cloud.credit(ACCT_A, "10.00")
    cloud.send(ACCT_A, 4 * GB)  # 6.00, threshold 5.00
    slow = BalanceBook(store, tariff, Thresholds(Decimal("5.00")))
    fast = BalanceBook(store, tariff, Thresholds(Decimal("5.00")))
    computed, go = threading.Event(), threading.Event()
    rate = slow.costs.costs

    def slow_costs(*args: Any, **kw: Any) -> Any:  # replica 1's rating, still running at t2
        out = rate(*args, **kw)
        computed.set()
        assert go.wait(30)
        return out

    slow.costs.costs = slow_costs  # type: ignore[method-assign]
    errors: list[BaseException] = []

    def replica_1() -> None:
        try:
            slow.evaluate(cloud.now)  # t1
        except BaseException as exc:  # pragma: no cover - shown below
            errors.append(exc)

    thread = threading.Thread(target=replica_1)
    thread.start()
    assert computed.wait(30)
    cloud.send(ACCT_A, 2 * GB)  # 4.00: below
    [first] = fast.evaluate(cloud.now + 1000)  # t2: replica 2 sees the fall, alert #1
    assert first.balance == Decimal("4.00")
    go.set()
    thread.join(30)
    assert not errors, errors
    fast.evaluate(cloud.now + 2000)  # t3: nothing changed since t2
    rows = alert_rows(store)
    assert len(rows) == 1, (
        f"one fall below the threshold raised {len(rows)} alerts: "
        f"{[(r['balance'], r['crossed_ms'] - cloud.now) for r in rows]} (a stale evaluation re-armed it)"
    )
    assert below_gauge(store, ACCT_A) == 1


def test_an_account_no_longer_watched_is_not_reported_below_for_ever(store: Store) -> None:
    """An account whose threshold is removed is not below anything any more (its state stayed
    below for ever: KvmeterBalanceBelowThreshold fired for an account nobody watches)."""
    cloud = Cloud(store)
    cloud.credit(ACCT_A, "10.00")
    cloud.send(ACCT_A, 6 * GB)  # 4.00
    [x] = BalanceBook(store, tariff, Thresholds(None, {ACCT_A: Decimal("5.00")})).evaluate(cloud.now)
    assert x.account == ACCT_A
    assert below_gauge(store, ACCT_A) == 1
    # The operator drops the account's threshold (no default): it is not watched any more.
    unwatched = BalanceBook(store, tariff, Thresholds(None, {}))
    for n in range(3):
        assert unwatched.evaluate(cloud.now + 1000 * (n + 1)) == []
    assert below_gauge(store, ACCT_A) in (None, 0), (
        "an account with no threshold any more is still reported below its threshold "
        "(KvmeterBalanceBelowThreshold fires for ever)"
    )


def test_an_account_watched_again_alerts_on_its_new_fall(store: Store) -> None:
    """Watched again after a top-up, a new fall below the threshold raises an alert (the stale
    "below" of the time it was not watched hid it)."""
    cloud = Cloud(store)
    cloud.credit(ACCT_A, "10.00")
    cloud.send(ACCT_A, 6 * GB)  # 4.00
    watched = Thresholds(None, {ACCT_A: Decimal("5.00")})
    assert len(BalanceBook(store, tariff, watched).evaluate(cloud.now)) == 1
    unwatched = BalanceBook(store, tariff, Thresholds(None, {}))
    assert unwatched.evaluate(cloud.now + 1000) == []
    cloud.credit(ACCT_A, "20.00")  # 24.00: well above 5.00
    assert unwatched.evaluate(cloud.now + 2000) == []
    cloud.send(ACCT_A, 22 * GB)  # 2.00
    raised = BalanceBook(store, tariff, watched).evaluate(cloud.now + 3000)
    assert [x.balance for x in raised] == [Decimal("2.00")], (
        f"the re-watched account fell from 24.00 to 2.00 below its threshold 5.00; alerts raised: {raised}"
    )


def test_cli_refuses_a_note_the_store_cannot_keep_with_a_clear_error(store_url: str) -> None:
    """`kvmeter credits add --note` is checked as POST /v1/credits checks it (PostgreSQL ended
    the command with a DataError traceback, SQLite stored it)."""
    s = Store(store_url)
    s.migrate()
    s.close()
    result = CliRunner().invoke(
        main,
        ["credits", "add", "--db", store_url, "--account", ACCT_A, "--amount", "25.00",
         "--currency", "EUR", "--note", "n" * 501],
    )  # fmt: skip
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code != 0
    assert "note" in result.output
    s = Store(store_url)
    with s.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(credits_table)).scalar() == 0
    s.close()


class Down(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(503)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def down_receiver() -> Iterator[str]:
    with serving(Down, "/alerts") as url:
        yield url


def test_a_webhook_outage_does_not_hold_up_the_next_crossing(store: Store, down_receiver: str) -> None:
    """Alerts are delivered on a thread of their own: a receiver that is down (each alert retried
    with backoff) does not hold up the evaluations, so a new crossing is alerted and counted
    within evaluate_seconds (it waited minutes behind the deliveries)."""
    cloud = Cloud(store)
    with store.write() as conn:  # crossings of other accounts while the receiver was down
        waiting = [Crossing(f"acct-{n}", Decimal("1"), Decimal("5"), "EUR") for n in range(3)]
        stored.add_alerts(conn, waiting, {x.account: 1 for x in waiting}, cloud.now - 60_000,
                          postgres=store.is_postgres)  # fmt: skip
    cloud.credit(ACCT_A, "10.00")
    section = BalancesConfig(
        thresholds=Thresholds(Decimal("5.00")), evaluate_s=0.2, webhook_url=down_receiver
    )
    book = balance_watch.book_for(section, store, tariff)
    metrics = Metrics(CollectorRegistry())
    stop = balance_watch.watch(section, book, metrics)
    assert stop is not None
    try:
        time.sleep(0.5)
        cloud.send(ACCT_A, 6 * GB)  # 4.00: below 5.00
        fell = time.monotonic()
        deadline = fell + 5.0
        while time.monotonic() < deadline:
            with store.read() as conn:
                if stored.alerts(conn, frozenset({ACCT_A})):
                    break
            time.sleep(0.1)
        with store.read() as conn:
            mine = stored.alerts(conn, frozenset({ACCT_A}))
        assert mine, (
            "5 s after the fall (evaluate_seconds = 0.2) no alert was raised: "
            "the watcher is still retrying deliveries to the receiver that is down"
        )
        assert metrics.registry.get_sample_value("kvmeter_balance_alerts_total", {"account": ACCT_A}) == 1
    finally:
        stop.set()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.pg)])
def live_and_into(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[tuple[Store, str]]:
    """A live store and the URL of an empty one to rebuild into, on the same database kind."""
    if request.param == "sqlite":
        urls = [f"sqlite:///{tmp_path}/live.db", f"sqlite:///{tmp_path}/rebuilt.db"]
    else:
        dsn = request.getfixturevalue("pg_dsn")
        urls = [postgres.create_database(dsn), postgres.create_database(dsn)]
    live = Store(urls[0])
    live.migrate()
    yield live, urls[1]
    live.close()


def _rebuilt(live: Store, into_url: str) -> Store:
    """The runbook: rebuild into a new store, then put it in service ([store] url)."""
    into = Store(into_url)
    into.migrate()
    rebuild(Settings(), None, live, into, lambda: Cloud(live).now)
    return into


def test_a_rebuild_keeps_the_credits(live_and_into: tuple[Store, str]) -> None:
    """A rebuild carries the credits: no topic or event holds a credit, the table is its only
    ledger (the rebuilt store put in service had lost every prepaid account's credits)."""
    live, into_url = live_and_into
    cloud = Cloud(live)
    cloud.credit(ACCT_A, "25.00")
    cloud.credit(ACCT_A, "5.50")
    cloud.credit(ACCT_B, "7")
    with live.read() as conn:
        before = stored.credit_sums(conn, None)
    into = _rebuilt(live, into_url)
    try:
        with into.read() as conn:
            after = stored.credit_sums(conn, None)
        assert after == before, f"credits after the rebuild: {after}; the live store held {before}"
    finally:
        into.close()


def test_a_rebuild_does_not_give_a_new_alert_an_old_alerts_idempotency_key(
    live_and_into: tuple[Store, str],
) -> None:
    """A rebuild carries the alerts with their ids and keys: a new alert never reuses the
    Idempotency-Key of one the receiver already acknowledged (ids began again at 1, and a
    receiver that deduplicates by the key dropped the new alert), and a carried alert keeps its
    own (sent again, it is recognised)."""
    live, into_url = live_and_into
    cloud = Cloud(live)
    cloud.credit(ACCT_A, "10.00")
    cloud.send(ACCT_A, 6 * GB)  # 4.00, below 5.00
    BalanceBook(live, tariff, Thresholds(Decimal("5.00"))).evaluate(cloud.now)
    with live.write() as conn:
        [old] = stored.alerts(conn, None)
        stored.mark_delivered(conn, int(old["id"]), cloud.now)  # the receiver has it
    into = _rebuilt(live, into_url)
    try:
        served = Cloud(into)  # the rebuilt store in service: B is credited and falls
        with into.write() as conn:
            stored.add_credit(conn, ACCT_B, Decimal("3.00"), "EUR", "", "operator", served.now)
        served.send(ACCT_B, 2 * GB)  # 1.00
        [x] = BalanceBook(into, tariff, Thresholds(Decimal("5.00"))).evaluate(served.now + 1000)
        assert x.account == ACCT_B
        with into.read() as conn:
            [new] = stored.alerts(conn, frozenset({ACCT_B}))
        assert balance_watch.idempotency_key(new) != balance_watch.idempotency_key(old), (
            f"the new alert of {ACCT_B} is POSTed with Idempotency-Key "
            f"{balance_watch.idempotency_key(new)}, already acknowledged for {old['account']}'s alert"
        )
        with into.read() as conn:
            [carried] = stored.alerts(conn, frozenset({ACCT_A}))
        assert balance_watch.idempotency_key(carried) == balance_watch.idempotency_key(old)
    finally:
        into.close()
