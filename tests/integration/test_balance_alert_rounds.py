"""The low-balance alerts' delivery queue and keys, on SQLite and PostgreSQL with a real loopback
receiver: alerts the receiver refuses never hold back the others (not in the next round, not for
the refused alerts' backoff), and an alert's Idempotency-Key is its own across stores (a new
installation's first alert is not taken for another's), the same on every retry and restart."""

from __future__ import annotations

import http.server
import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import ClassVar

import pytest

from kvmeter.collector.balance_watch import AlertWebhook, BalanceBook
from kvmeter.collector.balances import Crossing, Thresholds
from kvmeter.collector.store import Store
from kvmeter.collector.store import credits as stored
from tests.billing_support import ACCT_A, ACCT_B, GB, Cloud, tariff
from tests.harness.http_receiver import serving
from tests.harness.ports import free_port, wait_for_port
from tests.integration.test_balances_front import TARIFF, AllInOne, allinone_toml, eventually

ROUND = 100  # alerts a delivery round reads at most
T0 = 1_700_000_000_000


class KnowsA(http.server.BaseHTTPRequestHandler):
    """A billing system's receiver that knows ACCT_A only: an alert for another account is
    refused with 422 (about that alert: trying it again will not change the answer)."""

    posts: ClassVar[list[str]] = []
    keys: ClassVar[dict[str, str]] = {}  # account -> the key its alert was POSTed with

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        KnowsA.posts.append(body["account"])
        KnowsA.keys[body["account"]] = self.headers["Idempotency-Key"]
        self.send_response(204 if body["account"] == ACCT_A else 422)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def knows_a() -> Iterator[str]:
    KnowsA.posts, KnowsA.keys = [], {}
    with serving(KnowsA, "/alerts") as url:
        yield url


def _raise(store: Store, accounts: list[str], at_ms: int) -> None:
    """Each account's first crossing, stored as an evaluation stores it (one alert each)."""
    crossings = [Crossing(a, Decimal("1.00"), Decimal("5.00"), "EUR") for a in accounts]
    with store.write() as conn:
        stored.add_alerts(conn, crossings, dict.fromkeys(accounts, 1), at_ms, postgres=store.is_postgres)


def _delivered(store: Store, account: str) -> bool:
    with store.read() as conn:
        return any(a["delivered_ms"] is not None for a in stored.alerts(conn, frozenset({account})))


def test_alerts_the_receiver_refuses_never_hold_back_a_newer_alert(store: Store, knows_a: str) -> None:
    """A round reads the oldest 100 undelivered alerts. With 100 alerts the receiver refuses for
    good (accounts it does not know), an alert raised after them is still delivered, in the next
    round: it was never read, round after round, while the refused ones stay undelivered (tried
    again in later rounds, never dropped)."""
    unknown = [f"unknown-{n:03d}" for n in range(ROUND)]
    _raise(store, unknown, T0)
    _raise(store, [ACCT_A], T0 + 60_000)  # a minute later: an account the receiver knows
    hook = AlertWebhook(knows_a, attempts=2, backoff_s=0.001, max_wait_s=0.001)
    for _ in range(3):
        hook.deliver(store)
        if _delivered(store, ACCT_A):
            break
    assert _delivered(store, ACCT_A), (
        f"{ACCT_A}'s alert never POSTed in 3 rounds ({len(KnowsA.posts)} POSTs, all for the "
        f"{ROUND} refused alerts ahead of it)"
    )
    with store.read() as conn:
        assert len(stored.undelivered(conn)) == ROUND  # the refused ones wait, none dropped


def test_an_alert_the_receiver_refuses_is_not_retried_within_its_round(store: Store, knows_a: str) -> None:
    """As the hand-off's webhook does: an alert refused with a 4xx about it (422) is POSTed once a
    round, not again at once with backoff (0.5 + 1 + 2 + 4 s by default: 100 refused alerts held a
    round, and every new alert behind it, for over 12 minutes), and the round goes on to the next
    alert; it is tried again in the next round."""
    _raise(store, [ACCT_B], T0)
    _raise(store, [ACCT_A], T0 + 1000)
    hook = AlertWebhook(knows_a, attempts=5, backoff_s=0.001, max_wait_s=0.001)
    assert hook.deliver(store) == (1, 1)
    assert KnowsA.posts == [ACCT_B, ACCT_A], f"POSTs in the round: {KnowsA.posts}"
    assert hook.deliver(store) == (0, 1)  # the next round tries it again, once
    assert KnowsA.posts[2:] == [ACCT_B]


class Dedup(http.server.BaseHTTPRequestHandler):
    """A receiver that deduplicates by Idempotency-Key, as a billing system does: a key it
    already acknowledged is acknowledged again without taking the alert. Its first `fail`
    POSTs get a 503 (down for a moment)."""

    fail: ClassVar[int] = 0
    posts: ClassVar[list[str]] = []
    taken: ClassVar[dict[str, str]] = {}  # key -> account of the alert taken under it

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        key = self.headers["Idempotency-Key"]
        Dedup.posts.append(key)
        if len(Dedup.posts) <= Dedup.fail:
            self.send_response(503)
        else:
            Dedup.taken.setdefault(key, body["account"])
            self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def dedup() -> Iterator[str]:
    Dedup.fail, Dedup.posts, Dedup.taken = 1, [], {}
    with serving(Dedup, "/alerts") as url:
        yield url


def test_a_new_installations_alert_is_not_taken_for_another_stores(
    store: Store, store_url: str, tmp_path: Path, dedup: str
) -> None:
    """The Idempotency-Key is unique across stores: a second installation (a fresh store, its
    alert ids starting at 1 again) posting to the same receiver gets its first alert taken, not
    dropped as a duplicate of the first installation's (`kvmeter-balance-alert-1` for both).
    Within a store the key stays the same on a retry (a 503 first) and after a restart (the
    store opened again)."""
    first = Cloud(store)
    first.credit(ACCT_A, "10.00")
    first.send(ACCT_A, 9 * GB)  # 1.00, below 5.00
    assert len(BalanceBook(store, tariff, Thresholds(Decimal("5.00"))).evaluate(first.now)) == 1
    hook = AlertWebhook(dedup, attempts=1)
    assert hook.deliver(store) == (0, 1)  # the receiver was down: a 503
    store.close()
    restarted = Store(store_url)  # the collector restarted
    try:
        assert hook.deliver(restarted) == (1, 0)
    finally:
        restarted.close()
    assert len(Dedup.posts) == 2
    assert Dedup.posts[0] == Dedup.posts[1], f"a retry changed the key: {Dedup.posts}"
    other = Store(f"sqlite:///{tmp_path}/another-installation.db")
    other.migrate()
    try:
        second = Cloud(other)
        second.credit(ACCT_B, "10.00")
        second.send(ACCT_B, 8 * GB)  # 2.00, below 5.00
        assert len(BalanceBook(other, tariff, Thresholds(Decimal("5.00"))).evaluate(second.now)) == 1
        assert hook.deliver(other) == (1, 0)
    finally:
        other.close()
    assert sorted(Dedup.taken.values()) == [ACCT_A, ACCT_B], (
        f"the receiver took {Dedup.taken}: the second installation's alert was POSTed under "
        f"{Dedup.posts[-1]}, the key of the first's"
    )


@pytest.mark.libvirt
def test_the_all_in_one_from_toml_delivers_a_new_alert_behind_a_round_of_refused_ones(
    tmp_path: Path, knows_a: str
) -> None:
    """Through `kvmeter run --all-in-one` from a TOML file whose [balances] webhook is a receiver
    that refuses (422) the 100 alerts already waiting in the store, for accounts it does not know:
    the fall of ACCT_A below its threshold is still POSTed within seconds, under the key stored
    with it (the round of refused alerts took 100 x 7.5 s of in-round backoff, and every later
    round began with them again, so it never was), and the refused alerts stay undelivered."""
    db = tmp_path / "usage.db"
    store = Store(f"sqlite:///{db}")
    store.migrate()
    _raise(store, [f"unknown-{n:03d}" for n in range(ROUND)], T0)
    cloud = Cloud(store)
    cloud.send(ACCT_A, 9 * GB)
    cloud.credit(ACCT_A, "10.00")  # 1.00 left: below 5.00 at the first evaluation
    (tmp_path / "tariff.toml").write_text(TARIFF)
    port = free_port()
    config = allinone_toml(
        tmp_path,
        db,
        f"""
[api]
listen = "127.0.0.1:{port}"
[billing]
tariff_file = "tariff.toml"
[balances]
threshold = "5.00"
evaluate_seconds = 0.2
webhook_url = "{knows_a}"
""",
    )
    daemon = AllInOne(tmp_path, config)
    daemon.start()
    try:
        wait_for_port("127.0.0.1", port, 30, f"kvmeter run --all-in-one\n{daemon.logs()}")
        eventually(
            lambda: _delivered(store, ACCT_A),
            f"{ACCT_A}'s alert delivered ({len(KnowsA.posts)} POSTs so far)\n{daemon.logs()}",
            timeout=8,
        )
        with store.read() as conn:
            [alert] = stored.alerts(conn, frozenset({ACCT_A}))
            assert len(stored.undelivered(conn)) == ROUND
        assert KnowsA.keys[ACCT_A] == alert["idempotency_key"]
        assert daemon.terminate(timeout=10) == 0, daemon.logs()
    finally:
        daemon.stop()
        store.close()
