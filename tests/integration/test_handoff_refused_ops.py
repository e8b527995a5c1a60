"""Operating the hand-off's refused items: the webhook refuses an item for good (a 4xx about the
item). The operator sees it on the dashboard, is alerted by a rule of its own, finds it with the
README's query and the receiver's answer, and the all-in-one started from a TOML file delivers
the others, offers the refused one again and reports it on /metrics until the receiver takes it."""

from __future__ import annotations

import json
import re
import signal
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from kvmeter.collector.model import UsageKey
from kvmeter.collector.outbox_relay import HandoffMetrics, Relay
from kvmeter.pipeline.sim.simlibvirt import write_node_xml
from tests.collector_support import HOUR, T0, VM1, wait_for
from tests.harness.ports import free_port, wait_for_port
from tests.integration.test_balances_front import request
from tests.integration.test_handoff_allinone import config_head, start_all_in_one
from tests.integration.test_handoff_edges import FAST, Server, answer, filled, outbox
from tests.integration.test_handoff_refusals import key, refusing, store_of
from tests.monitoring_support import RULE_TESTS, TOP, alert_rules, dashboard, panels, rule_metrics

REFUSED = "kvmeter_handoff_refused_items"


def readme_query() -> str:
    """The README's SQL that lists the refused items (its hand-off section), as an operator
    would paste it."""
    text = " ".join((TOP / "README.md").read_text().split())
    found = re.search(r"`(SELECT transaction_id, last_error FROM handoff_outbox WHERE[^`]*)`", text)
    assert found, "the README's hand-off section names no query for the refused items"
    return found.group(1)


def test_the_refused_items_gauge_has_a_panel_and_a_unit_tested_alert() -> None:
    """kvmeter_handoff_refused_items is drawn in the dashboard's hand-off row and read by an
    alert rule (with a `for:`, so a refusal fixed at once does not page) that the rules' promtool
    unit tests exercise (tests/unit/test_monitoring.py runs them, and its mutation test proves
    they hold an expectation that it fires and one that it stays quiet)."""
    board = dashboard("collector")
    drawn = [p for p in panels(board) if any(REFUSED in t["expr"] for t in p["targets"])]
    assert drawn, f"no panel of the collector's dashboard shows {REFUSED}"
    row = next(p for p in board["panels"] if p["type"] == "row" and p["title"].startswith("Hand-off"))
    assert drawn[0]["gridPos"]["y"] == row["gridPos"]["y"] + 1, "the panel is not in the hand-off row"
    assert REFUSED in rule_metrics("collector")
    [rule] = [r for r in alert_rules("collector") if REFUSED in r["expr"]]
    assert rule.get("for"), f"{rule['alert']} fires at the first scrape of a refusal"
    tests = (RULE_TESTS / "kvmeter-collector.test.yml").read_text()
    assert f"alertname: {rule['alert']}" in tests


def answering(status: dict[str, int]) -> Server:
    """A receiver that answers each item status[its transaction id], else status["*"] (read at
    each POST: a test changes its mind between rounds)."""
    return Server(lambda h, body: answer(h, status.get(json.loads(body)["transaction_id"], status["*"])))


def test_a_refused_items_answer_survives_a_later_round_that_stops_before_it(store_url: str) -> None:
    """The receiver refuses item A (422); in a later round it fails (503) on a newer item B, which
    is offered first, so the round stops before A. A is still counted as refused, and the README's
    query must still show the receiver's answer about A (it showed B's 503 instead: the release of
    the round's unsent rows wrote the round's error over every refused row's answer, so the
    operator could not tell why billing refuses A)."""
    store = store_of(store_url, [key(0)])
    [a] = [r["transaction_id"] for r in outbox(store)]
    status = {a: 422, "*": 200}
    server = answering(status)
    try:
        relay = Relay(
            store, replace(FAST, webhook_url=server.url), HandoffMetrics(CollectorRegistry(), store)
        )
        relay.round()
        newer = UsageKey("acct-new", 4, VM1, "", "public", T0 + HOUR, T0 + 2 * HOUR)
        with store.write() as conn:
            store.add_bytes(conn, {newer: 5}, {}, 0, 3)
        with store.write() as conn:
            store.finalize(conn, T0 + 2 * HOUR, 4)
        b = next(r["transaction_id"] for r in outbox(store) if r["transaction_id"] != a)
        status.update({a: 503, "*": 503})  # the receiver is down now
        relay.round()
        assert len(server.requests) == 1 + FAST.retry_attempts, "the round did not stop at B"
    finally:
        server.close()
    assert store.outbox_refused() == 1
    with store.read() as conn:  # as an operator runs it, with sqlite3 or psql
        listed = dict(conn.execute(sa.text(readme_query())).all())
    store.close()
    assert set(listed) == {a}, f"the README's query lists {sorted(listed)}, not the refused item alone"
    assert "HTTP 422" in listed[a], f"the refused item's last_error: {listed[a]!r}"
    assert b not in listed[a]


def test_an_item_refused_for_good_is_not_a_failed_delivery(store_url: str) -> None:
    """Rounds in which the webhook's only pending item is refused (422), as between two hourly
    finalizations: counted in kvmeter_handoff_refused_items, not in
    kvmeter_handoff_delivery_errors_total (which grew by one a round, about one a second, while
    kvmeter_handoff_delivered_total stood still, so KvmeterHandoffDeliveryFailing, "fails and
    delivers nothing", fired 15 minutes after each hourly burst of items though the receiver
    took them all); a receiver that is down (503) still counts as failed deliveries."""
    store = store_of(store_url, [key(0)])
    [a] = [r["transaction_id"] for r in outbox(store)]
    registry = CollectorRegistry()
    errors = {"sink": "webhook"}
    status = {a: 422, "*": 200}
    server = answering(status)
    try:
        relay = Relay(store, replace(FAST, webhook_url=server.url), HandoffMetrics(registry, store))
        for _ in range(3):
            relay.round()
        assert len(server.requests) == 3
        assert registry.get_sample_value(REFUSED) == 1
        assert not registry.get_sample_value("kvmeter_handoff_delivery_errors_total", errors)
        status[a] = 503  # the receiver is down now
        relay.round()
    finally:
        server.close()
        store.close()
    assert registry.get_sample_value("kvmeter_handoff_delivery_errors_total", errors) == FAST.retry_attempts


def test_the_all_in_one_from_toml_delivers_around_a_refused_item_and_reports_it(tmp_path: Path) -> None:
    """`kvmeter run --all-in-one` from a TOML file, its [handoff] webhook at a loopback receiver
    that refuses one of four items (422) and takes the others: the three others are delivered,
    the refused one is POSTed again in later rounds, /metrics shows kvmeter_handoff_refused_items
    1, the log and the README's query name it with the receiver's answer; once the receiver takes it, it
    is delivered and the gauge is back to 0. Front-door coverage of the refusals (it passes on the
    code as it is)."""
    db = f"sqlite:///{tmp_path}/usage.db"
    filled(tmp_path, 4).close()
    ids = _pending(tmp_path)
    bad = ids[0]  # the oldest: offered first, then after the others
    refused, posted = {bad}, []
    server = Server(refusing(refused, posted))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = tmp_path / "allinone.toml"
    config.write_text(
        config_head(tmp_path, write_node_xml(tmp_path / "node.xml", []), db).replace(
            "[api]\nenabled = false", f'[api]\nlisten = "127.0.0.1:{port}"'
        )
        + f"""
[handoff]
webhook_url = "{server.url}"
retry_attempts = 2
retry_initial_seconds = 0.05
retry_max_seconds = 0.1
refused_retry_initial_seconds = 0.1
refused_retry_max_seconds = 0.4
poll_seconds = 0.2
"""
    )
    log = tmp_path / "allinone.log"
    proc = start_all_in_one(config, log)
    try:
        wait_for_port("127.0.0.1", port, 30, f"the all-in-one's API\n{log.read_text()}")
        wait_for(lambda: _pending(tmp_path) == [bad], 20, "the three others delivered", log.read_text)
        wait_for(lambda: posted.count(bad) >= 3, 10, "the refused item offered again", log.read_text)
        assert all(posted.count(i) == 1 for i in ids[1:]), posted
        wait_for(lambda: _gauge(base) == 1.0, 10, f"{REFUSED} 1 on /metrics", log.read_text)
        with sqlite3.connect(tmp_path / "usage.db") as conn:
            listed = dict(conn.execute(readme_query()).fetchall())
        assert list(listed) == [bad], listed
        assert "HTTP 422" in listed[bad], listed
        assert f"the webhook refused 1 item(s), offered again after the others: {bad}" in log.read_text()
        refused.clear()  # the receiver is fixed: the item goes out by itself
        wait_for(lambda: not _pending(tmp_path), 10, "the refused item delivered", log.read_text)
        assert _gauge(base) == 0.0
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        server.close()
    assert code == 0, log.read_text()[-3000:]
    assert sorted(set(posted)) == sorted(ids)


def _pending(tmp_path: Path) -> list[str]:
    with sqlite3.connect(tmp_path / "usage.db") as conn:
        rows = conn.execute("SELECT transaction_id FROM handoff_outbox WHERE sent_ms IS NULL ORDER BY id")
        return [r[0] for r in rows]


def _gauge(base: str) -> Any:
    for line in request(base, "/metrics")[1].splitlines():
        if line.startswith(f"{REFUSED} "):
            return float(line.split()[1])
    return None
