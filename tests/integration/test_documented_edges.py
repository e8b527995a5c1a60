"""What the README promises, where the code did otherwise: a balance alert redirected or answered
with no HTTP, `max_page_size` alone, an all-in-one's file without [agent], the CLI's cloudstack
format of no records."""

from __future__ import annotations

import http.server
import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import ClassVar

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, Counter

from kvmeter.cli import main
from kvmeter.collector import config as collector_config
from kvmeter.collector.api import create_app
from kvmeter.collector.balance_watch import AlertWebhook, BalanceBook, BalanceWatcher
from kvmeter.collector.balances import Thresholds
from kvmeter.collector.schema_credits import balance_alerts
from kvmeter.collector.store import Store
from kvmeter.collector.store import credits as stored
from kvmeter.pipeline import allinone
from tests.api_support import filled_store
from tests.billing_support import ACCT_A, ACCT_B, GB, Cloud, tariff
from tests.harness.http_receiver import not_http, serving


class Redirecting(http.server.BaseHTTPRequestHandler):
    """Answers every POST with 303 See Other to a page that answers GET with 200."""

    posts: ClassVar[list[str]] = []
    gets: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        Redirecting.posts.append(self.path)
        self.send_response(303)
        self.send_header("Location", "/elsewhere")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        Redirecting.gets.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def redirecting() -> Iterator[str]:
    Redirecting.posts, Redirecting.gets = [], []
    with serving(Redirecting) as url:
        yield url


def _watcher(cloud: Cloud, url: str) -> tuple[BalanceWatcher, CollectorRegistry]:
    """A balance watcher alerting below 5.00 to `url` (two quick attempts), and its registry."""
    registry = CollectorRegistry()
    alerts = Counter("kvmeter_balance_alerts", "", ["account"], registry=registry)
    failures = Counter("kvmeter_balance_webhook_failures", "", registry=registry)
    book = BalanceBook(cloud.store, tariff, Thresholds(Decimal("5.00"), {}))
    hook = AlertWebhook(url, attempts=2, backoff_s=0.01, max_wait_s=0.02)
    return BalanceWatcher(book, hook, alerts, failures, clock=lambda: cloud.now), registry


def test_balance_alert_redirected_by_the_receiver_is_not_taken_as_delivered(
    store: Store, redirecting: str
) -> None:
    """README (Credits, balances): the webhook gets a POST per alert, retried until a 2xx. A 3xx
    is not a 2xx: the alert stays undelivered (and is counted as a failure) instead of being
    marked delivered on the 200 of a GET that urllib made of the redirected POST."""
    cloud = Cloud(store)
    cloud.credit(ACCT_A, "10.00")
    cloud.send(ACCT_A, 9 * GB)  # 1.00 left, below 5.00
    watcher, registry = _watcher(cloud, redirecting)
    assert len(watcher.once()) == 1
    assert Redirecting.posts  # the receiver was asked
    assert Redirecting.gets == []  # the redirect was not followed with a GET
    with store.read() as conn:
        [row] = stored.alerts(conn, None)
    assert row["delivered_ms"] is None
    assert registry.get_sample_value("kvmeter_balance_webhook_failures_total") == 1


def test_max_page_size_alone_below_the_default_page_size_is_accepted() -> None:
    """README (/v1): `limit` is `[api] page_size`, 1,000 by default, at most `[api] max_page_size`,
    each configurable from 1 to 100,000. Setting max_page_size alone to 500 is a valid config:
    the default page is then the largest allowed (500), not a refusal naming page_size, a key the
    operator never set. A page_size the operator sets above max_page_size is still refused."""
    doc = {"kafka": {"bootstrap": "127.0.0.1:9092"}, "api": {"max_page_size": 500}}
    cfg = collector_config.from_dict(doc)
    assert (cfg.api.paging.page_size, cfg.api.paging.max_page_size) == (500, 500)
    with pytest.raises(collector_config.ConfigError, match=r"api\.page_size: 600 is above"):
        collector_config.from_dict({"api": {"page_size": 600, "max_page_size": 500}})


def test_store_commands_take_an_all_in_one_file_without_an_agent_section(tmp_path: Path) -> None:
    """README (Running it): `kvmeter prune`, `costs`, `credits`, `dead-letters` and `reconcile`
    take a collector's or an all-in-one's config. An all-in-one file whose [agent] section is
    left out (every key has a default) but which has [libvirt] and [lifecycle] events_file is
    what `kvmeter run --all-in-one` runs on; the store commands read its collector part too,
    instead of refusing it as a collector's file with unknown keys."""
    db = tmp_path / "usage.db"
    path = tmp_path / "allinone.toml"
    path.write_text(
        '[libvirt]\nuri = "test:///default"\n\n'
        f'[store]\nurl = "sqlite:///{db}"\n\n'
        f'[lifecycle]\nevents_file = "{tmp_path / "events.jsonl"}"\n'
    )
    assert allinone.load(path).collector.db_url == f"sqlite:///{db}"  # the all-in-one takes it
    result = CliRunner().invoke(main, ["prune", "--config", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "unknown key" not in result.output
    listed = CliRunner().invoke(main, ["dead-letters", "list", "--config", str(path)])
    assert listed.exit_code == 0, listed.output


@pytest.fixture
def no_http() -> Iterator[str]:
    with not_http() as url:
        yield url


def test_balance_alert_answered_with_no_http_is_a_counted_failure_and_holds_no_other_alert(
    store: Store, no_http: str
) -> None:
    """README (Credits, balances): each alert is retried until a 2xx and in later rounds while it
    fails. An answer that is not HTTP is a failed delivery like any other: counted in
    kvmeter_balance_webhook_failures_total and the alert kept for the next round (not an
    exception that ends the watcher). As the receiver is failing, the round ends there (the
    other alert is not put through its attempts too) and the next round tries the other first:
    a failing alert holds no other alert back."""
    cloud = Cloud(store)
    for account in (ACCT_A, ACCT_B):
        cloud.credit(account, "10.00")
        cloud.send(account, 9 * GB)
    watcher, registry = _watcher(cloud, no_http)
    assert len(watcher.once()) == 2
    assert registry.get_sample_value("kvmeter_balance_webhook_failures_total") == 1
    first = _attempts(store)
    assert sorted(first.values()) == [0, 2], first  # one alert through its two attempts, then the end
    assert watcher.once() == []
    assert registry.get_sample_value("kvmeter_balance_webhook_failures_total") == 2
    with store.read() as conn:
        rows = stored.alerts(conn, None)
    assert [r["delivered_ms"] for r in rows] == [None, None]
    assert _attempts(store) == {a: 2 for a in first}  # the other's turn


def _attempts(store: Store) -> dict[str, int]:
    """Each alert's attempts so far, by account."""
    a = balance_alerts.c
    with store.read() as conn:
        return {str(row[0]): int(row[1]) for row in conn.execute(sa.select(a.account, a.attempts))}


def test_cli_cloudstack_format_of_no_records_is_the_apis_answer(tmp_path: Path) -> None:
    """README (CloudStack's API): `kvmeter usage --format cloudstack` gives the same answer as
    listUsageRecords with response=json. For a range with no records that is CloudStack's empty
    response, `{"listusagerecordsresponse": {}}` (no count, no list), not a count of 0 and an
    empty list that neither CloudStack nor kvmeter's API ever send."""
    store, _ = filled_store(tmp_path)
    url = f"sqlite:///{tmp_path}/usage.db"
    api = (
        create_app(store)
        .test_client()
        .get("/client/api?command=listUsageRecords&startdate=2001-01-01&enddate=2001-01-02&response=json")
    )
    assert api.status_code == 200
    cli = CliRunner().invoke(
        main,
        ["usage", "--db", url, "--start", "2001-01-01", "--end", "2001-01-02", "--format", "cloudstack"],
    )
    assert cli.exit_code == 0, cli.output
    store.close()
    assert json.loads(cli.output) == json.loads(api.data) == {"listusagerecordsresponse": {}}
