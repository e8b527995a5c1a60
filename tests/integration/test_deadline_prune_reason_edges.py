"""Outbound deliveries, the retention CLI's dry run and policy adjustments, each defect shown by a
test (SQLite stores in tmp_path, real HTTP receivers on loopback: no broker, no PostgreSQL)."""

from __future__ import annotations

import dataclasses
import http.server
import time
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import ClassVar

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from kvmeter.collector.balance_watch import AlertWebhook
from kvmeter.collector.balances import Crossing
from kvmeter.collector.config_handoff import HandoffConfig
from kvmeter.collector.model import Record, Settings
from kvmeter.collector.outbox_relay import HandoffMetrics, Relay
from kvmeter.collector.policy import BillingPolicy
from kvmeter.collector.policy_change import put_in_force, put_in_force_at_start
from kvmeter.collector.prune import Pruner
from kvmeter.collector.reconcile import Correction
from kvmeter.collector.retention import DAY_MS
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store, reconciliation
from kvmeter.collector.store import credits as stored
from tests.collector_support import ACCT_A, HOUR, MIN, T0, VM1, VM3, Clock, usage_event
from tests.harness.http_receiver import serving
from tests.integration.test_handoff_edges import filled, outbox
from tests.retention_support import (
    POLICY,
    add_outbox,
    correct_a_pruned_and_a_kept_event,
    event_resources,
    feed,
    month,
    row_counts,
    stored_event_id,
)

TRICKLE_S = 5.0  # how long the trickling receiver holds each POST
TIMEOUT_S = 1.0  # the configured timeout: a POST is over within it


def trickling() -> type[http.server.BaseHTTPRequestHandler]:
    """Reads the POST, then answers 200 a byte of a header at a time, one every 0.2 s for
    TRICKLE_S: every read of the sender's gets a byte well within its socket timeout."""

    class Trickle(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            try:
                self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Slow: ")
                self.wfile.flush()
                ends = time.monotonic() + TRICKLE_S
                while time.monotonic() < ends:
                    time.sleep(0.2)
                    self.wfile.write(b"z")
                    self.wfile.flush()
                self.wfile.write(b"\r\n\r\n")
                self.wfile.flush()
            except OSError:  # the sender gave up
                pass
            self.close_connection = True

        def log_message(self, *_args: object) -> None:
            pass

    return Trickle


class Prompt(http.server.BaseHTTPRequestHandler):
    """Answers 200 at once; the idempotency keys it got, in order."""

    posts: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        Prompt.posts.append(self.headers.get("Idempotency-Key", ""))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        pass


def test_a_trickling_handoff_receiver_cannot_hold_a_round_past_its_timeout(tmp_path: Path) -> None:
    """[handoff] timeout_seconds bounds a POST as a whole: a receiver trickling its answer (a
    byte every 0.2 s, within any per-read timeout) makes the POST fail after timeout_seconds,
    so a round with 2 attempts is over in about 2 timeouts, and the item is not marked sent: it
    waits for the next round and is then delivered once, under the same transaction id (the
    POST lasted as long as the receiver liked, holding the round and its lease)."""
    store = filled(tmp_path, 1)
    cfg = HandoffConfig(retry_attempts=2, retry_initial_s=0.01, retry_max_s=0.02, timeout_s=TIMEOUT_S)
    with serving(trickling(), "/items") as url:
        relay = Relay(store, replace(cfg, webhook_url=url), HandoffMetrics(CollectorRegistry(), store))
        started = time.monotonic()
        claimed, ok = relay.round()
        took = time.monotonic() - started
    assert took < 2 * TIMEOUT_S + 1.5, f"the round took {took:.1f} s with timeout_seconds = {TIMEOUT_S}"
    assert (claimed, ok) == (1, False)
    row = outbox(store)[0]
    assert (row["webhook_sent_ms"], row["claimed_until_ms"]) == (None, None)
    assert row["last_error"]
    Prompt.posts = []
    with serving(Prompt, "/items") as url:
        relay = Relay(store, replace(cfg, webhook_url=url), HandoffMetrics(CollectorRegistry(), store))
        assert relay.round() == (1, True)
    assert Prompt.posts == [row["transaction_id"]]
    assert outbox(store)[0]["webhook_sent_ms"] is not None


def test_the_all_in_one_from_toml_ends_a_trickled_handoff_post_at_timeout_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`[handoff] timeout_seconds` read from the all-in-one's TOML bounds each POST as a whole:
    against a receiver that trickles its answer, the relay's next attempt comes within about
    the timeout, not when the receiver is done (TRICKLE_S)."""
    from tests.integration.test_allinone_edges import _all_in_one

    filled(tmp_path, 1).close()  # a final window: one item in the outbox
    starts: list[float] = []

    class Timed(trickling()):  # type: ignore[misc]
        def do_POST(self) -> None:
            starts.append(time.monotonic())
            super().do_POST()

    with serving(Timed, "/items") as url:
        pipeline, _ = _all_in_one(
            tmp_path,
            monkeypatch,
            extra=f'[handoff]\nwebhook_url = "{url}"\ntimeout_seconds = {TIMEOUT_S}\nretry_attempts = 2\n'
            "retry_initial_seconds = 0.05\nretry_max_seconds = 0.1\n",
        )
        try:
            deadline = time.monotonic() + TRICKLE_S + 3
            while len(starts) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            pipeline.close()
    assert len(starts) >= 2, "the relay never tried again"
    assert starts[1] - starts[0] < TIMEOUT_S + 1.5, f"a POST was held {starts[1] - starts[0]:.1f} s"


def test_a_trickling_balance_webhook_cannot_hold_a_delivery_past_its_timeout(tmp_path: Path) -> None:
    """[balances] webhook_timeout_seconds bounds an alert's POST as a whole: a receiver
    trickling its answer makes the attempt fail after the timeout (the alert counted failed,
    left undelivered for the next round, then delivered); it held the deliveries as long as
    the receiver liked."""
    store = Store(f"sqlite:///{tmp_path}/usage.db")
    store.migrate()
    with store.write() as conn:
        crossing = Crossing(ACCT_A, Decimal("1"), Decimal("5"), "EUR")
        stored.add_alerts(conn, [crossing], {ACCT_A: 1}, T0, postgres=False)
    with serving(trickling(), "/alerts") as url:
        started = time.monotonic()
        result = AlertWebhook(url, timeout_s=TIMEOUT_S, attempts=1).deliver(store)
        took = time.monotonic() - started
    assert took < TIMEOUT_S + 1.5, (
        f"the delivery took {took:.1f} s with webhook_timeout_seconds = {TIMEOUT_S}"
    )
    assert result == (0, 1)
    with store.read() as conn:
        assert len(stored.undelivered(conn)) == 1
    with serving(Prompt, "/alerts") as url:
        assert AlertWebhook(url, timeout_s=TIMEOUT_S, attempts=1).deliver(store) == (1, 0)
    with store.read() as conn:
        assert stored.undelivered(conn) == []
    store.close()


def test_a_dry_run_counts_the_corrections_a_pass_deletes(tmp_path: Path) -> None:
    """`kvmeter prune --dry-run` (Pruner.run(dry_run=True)) reports exactly what a pass then
    deletes: a reconciliation correction whose event goes in the same pass (VM1's history is
    closed and old) is deleted by the pass, so the dry run counts it too (it counted 0: the
    event was still stored when it looked)."""
    store = Store(f"sqlite:///{tmp_path}/usage.db")
    store.migrate()
    clock = Clock(T0)
    feed(store, clock, month())
    add_outbox(store)
    correct_a_pruned_and_a_kept_event(store)
    policy = dataclasses.replace(POLICY, dead_letters_open_ms=DAY_MS, usage_ms=7 * DAY_MS)
    before = row_counts(store)
    dry = Pruner(store, policy, clock).run(dry_run=True)
    assert row_counts(store) == before
    real = Pruner(store, policy, clock).run()
    assert real["corrections"] == 1 == before["corrections"] - row_counts(store)["corrections"]
    assert dry == real
    store.close()


def test_a_dry_run_counts_the_events_a_pass_frees_of_parked_measures(tmp_path: Path) -> None:
    """A dry run reports exactly what a pass then deletes: a closed, old history whose uuid only
    an old reported parked measure carries goes in the pass (the measure is deleted first), so
    the dry run counts its events (and its correction) too; it counted them as kept."""
    store = Store(f"sqlite:///{tmp_path}/usage.db")
    store.migrate()
    clock = Clock(T0)
    feed(store, clock, month())
    with store.write() as conn:  # VM3's measure, reported 28 days ago, now carries VM1's uuid
        conn.execute(sa.text("UPDATE parked_measures SET instance_uuid = :v WHERE instance_uuid = :o"),
                     {"v": VM1, "o": VM3})  # fmt: skip
        reconciliation.save_corrections(
            conn, [Correction(VM1, "VirtualMachine", "VM.STOP", T0, ACCT_A, "test", details=())], T0
        )
        conn.execute(sa.text("UPDATE corrections SET event_id = :e"), {"e": stored_event_id(store, VM1)})
    before = row_counts(store)
    dry = Pruner(store, POLICY, clock).run(dry_run=True)
    real = Pruner(store, POLICY, clock).run()
    after = row_counts(store)
    assert VM1 not in event_resources(store)
    assert real["lifecycle_events"] == before["lifecycle_events"] - after["lifecycle_events"]
    assert real["corrections"] == 1
    assert dry == real
    store.close()


def test_adjustments_of_a_policy_change_say_so(tmp_path: Path) -> None:
    """Adjustments a changed [policy] makes (SIGHUP: put_in_force) carry the reason
    "policy change" on /v1/adjustments, the CLI and the hand-off's items, not "late lifecycle"
    (no lifecycle event came late); adjustments by late events keep "late lifecycle"."""
    store = Store(f"sqlite:///{tmp_path}/usage.db")
    store.migrate()
    clock = Clock(T0 + 4 * HOUR)
    live = Collector(store, Settings(), clock)
    put_in_force_at_start(live)
    vm = "vm-policy"
    live.apply_events(
        [
            _record(usage_event("VM.CREATE", vm, ACCT_A, T0)),
            _record(usage_event("VM.START", vm, ACCT_A, T0 + 40 * MIN)),
            _record(usage_event("VM.STOP", vm, ACCT_A, T0 + 2 * HOUR)),
            _record(usage_event("VM.DESTROY", vm, ACCT_A, T0 + 3 * HOUR)),
        ]
    )
    live.tick()
    clock.now = T0 + 8 * HOUR  # the first hours final: the change adjusts them
    live.tick()
    made = clock.now
    out = put_in_force(live, BillingPolicy(allocated_from="first_start", allocated_until="expunge"))
    assert "0 adjustment(s)" not in out, out
    reasons = {a.reason for a in store.adjustments(made)}
    assert reasons == {"policy change"}, reasons


def _record(pair: tuple[bytes, bytes]) -> Record:
    key, value = pair
    return Record(value, key)
