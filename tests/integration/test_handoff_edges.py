"""The hand-off to billing at its edges (collector/outbox_relay.py, outbox_sinks.py,
store/outbox.py), with SQLite stores, real HTTP receivers on loopback and a stand-in Kafka
producer: a webhook that is down does not hold the topic back, one item the webhook refuses does
not hold the others, a redirect is not a delivery, a fatal producer error or an answer that is
not HTTP is a counted failed delivery that stalls no sink."""

from __future__ import annotations

import http.server
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from kvmeter.collector.config_handoff import HandoffConfig
from kvmeter.collector.model import UsageKey
from kvmeter.collector.outbox_relay import HandoffMetrics, Relay
from kvmeter.collector.outbox_sinks import KafkaSink
from kvmeter.collector.schema import handoff_outbox
from kvmeter.collector.store import Store
from tests.collector_support import HOUR, T0, VM1
from tests.harness.http_receiver import not_http

# A refused item offered again at every round (no pause): these tests are about the order of
# the offers (the pause is tested on its own).
FAST = HandoffConfig(
    retry_attempts=2, retry_initial_s=0.01, retry_max_s=0.02, timeout_s=1, batch_size=5,
    refused_retry_initial_s=0, refused_retry_max_s=0,
)  # fmt: skip


def filled(tmp_path: Path, n: int) -> Store:
    """A SQLite store whose outbox holds n record items (n accounts, one final window each)."""
    store = Store(f"sqlite:///{tmp_path}/usage.db", outbox=True)
    store.migrate()
    keys = [UsageKey(f"acct-{a:03d}", 4, VM1, "", "public", T0, T0 + HOUR) for a in range(n)]
    with store.write() as conn:
        store.add_bytes(conn, {k: 1000 + i for i, k in enumerate(keys)}, {}, 0, 1)
    with store.write() as conn:
        store.finalize(conn, T0 + HOUR, 2)
    return store


def outbox(store: Store) -> list[dict[str, Any]]:
    with store.read() as conn:
        return [dict(r._mapping) for r in conn.execute(handoff_outbox.select().order_by(handoff_outbox.c.id))]


def relay_of(store: Store, cfg: HandoffConfig) -> Relay:
    return Relay(store, cfg, HandoffMetrics(CollectorRegistry(), store))


class FakeProducer:
    """confluent_kafka.Producer as KafkaSink uses it: every message is acknowledged by the broker."""

    def __init__(self) -> None:
        self.pending: list[Any] = []
        self.ids: list[str] = []

    def produce(self, topic: str, key: bytes, value: bytes, headers: Any, on_delivery: Any) -> None:
        self.pending.append(on_delivery)
        self.ids.append(dict(headers)["transaction_id"].decode())

    def poll(self, _timeout: float = 0) -> int:
        return 0

    def flush(self, _timeout: float = 0) -> int:
        for cb in self.pending:
            cb(None, None)
        self.pending = []
        return 0


class Server:
    """A loopback HTTP server; `handle(handler)` answers each request."""

    def __init__(self, handle: Any):
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0") or 0))
                server.requests.append((self.command, self.path, dict(self.headers), body))
                handle(self, body)

            do_POST = do_GET = _any

            def log_message(self, *_args: Any) -> None:
                return

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/items"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def answer(handler: Any, status: int, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
    handler.send_response(status)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def test_kafka_items_flow_while_the_webhook_is_down(tmp_path: Path, monkeypatch: Any) -> None:
    """A round claims the oldest rows each sink lacks, per sink: with a topic and a webhook, a
    webhook that is down does not keep the topic from the rows after the first batch (every
    round claimed that batch again, which the topic had, and nothing past it was offered)."""
    store = filled(tmp_path, 12)
    down = Server(lambda h, _b: answer(h, 503))
    try:
        cfg = replace(FAST, topic="billable", bootstrap="127.0.0.1:1", webhook_url=down.url)
        producer = FakeProducer()
        monkeypatch.setattr("confluent_kafka.Producer", lambda _conf: producer)
        relay = relay_of(store, cfg)
        assert isinstance(relay.sinks[0], KafkaSink)
        assert relay.sinks[0].producer is producer
        for _ in range(6):  # rounds while the webhook is down
            relay.round()
    finally:
        down.close()
    rows = outbox(store)
    on_topic = [r["transaction_id"] for r in rows if r["topic_sent_ms"] is not None]
    assert len(on_topic) == len(rows), (
        f"Kafka confirmed {len(on_topic)} of {len(rows)} items after 6 rounds (webhook down); "
        f"produced {len(set(producer.ids))} distinct ids"
    )


def test_a_sink_taken_out_of_the_config_leaves_no_item_waiting_for_it(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """The topic has every item, the webhook (down) none; the operator takes the webhook out of
    [handoff]: the next relay's first round counts every item the topic has as sent (they
    waited for the webhook for ever: pending, never pruned, the stalled alert firing)."""
    store = filled(tmp_path, 4)
    down = Server(lambda h, _b: answer(h, 503))
    monkeypatch.setattr("confluent_kafka.Producer", lambda _conf: FakeProducer())
    try:
        relay_of(
            store, replace(FAST, topic="billable", bootstrap="127.0.0.1:1", webhook_url=down.url)
        ).round()
    finally:
        down.close()
    assert store.outbox_stats()[0] == 4
    relay_of(store, replace(FAST, topic="billable", bootstrap="127.0.0.1:1")).round()
    assert store.outbox_stats() == (0, None)
    assert all(r["sent_ms"] is not None and r["webhook_sent_ms"] is None for r in outbox(store))


def test_one_item_the_webhook_rejects_does_not_stall_the_others(tmp_path: Path) -> None:
    """An item the receiver refuses (a 4xx about the item: 422, 400, 413) waits for the next
    round and the items after it go on (the round stopped at it, and every round began with it:
    one bad item held every later one for ever)."""
    store = filled(tmp_path, 6)
    first = outbox(store)[0]["transaction_id"]

    def handle(h: Any, _body: bytes) -> None:
        answer(h, 422 if h.headers.get("Idempotency-Key") == first else 200)

    server = Server(handle)
    try:
        relay = relay_of(store, replace(FAST, webhook_url=server.url))
        for _ in range(4):
            relay.round()
    finally:
        server.close()
    rows = outbox(store)
    others = [r for r in rows if r["transaction_id"] != first]
    sent = [r for r in others if r["sent_ms"] is not None]
    assert len(sent) == len(others), f"{len(sent)} of the {len(others)} good items delivered after 4 rounds"


def test_a_redirect_is_not_taken_for_a_delivery(tmp_path: Path) -> None:
    """A 3xx is not followed: urllib's default opener answered a 302 to the POST with a GET
    (no body, the headers sent along to whatever Location names) and took that GET's 200 for the
    receiver's acknowledgement: an item marked sent that billing never got."""
    store = filled(tmp_path, 1)

    def handle(h: Any, _body: bytes) -> None:
        if h.command == "POST":
            answer(h, 302, {"Location": "/login"})
        else:
            answer(h, 200, body=b"<html>please log in</html>")

    server = Server(handle)
    try:
        relay = relay_of(
            store, replace(FAST, webhook_url=server.url, webhook_headers={"Authorization": "Bearer tok"})
        )
        relay.round()
    finally:
        server.close()
    posted = [r for r in server.requests if r[0] == "POST"]
    row = outbox(store)[0]
    assert row["sent_ms"] is None, (
        f"item marked sent after {[(m, p) for m, p, _, _ in server.requests]}: the receiver never "
        f"answered 2xx to a POST ({len(posted)} POST(s), all redirected)"
    )


def test_a_fatal_producer_error_stalls_neither_the_webhook_nor_the_topic(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """An idempotent producer's fatal error (sequence loss, a fenced producer id) leaves it
    unusable: every produce() raises. The webhook still gets its turn and the topic sink builds
    a new producer (the exception escaped the round, round after round: nothing reached billing
    by either path until a restart)."""
    from confluent_kafka import KafkaError, KafkaException

    made: list[Any] = []

    class Producer(FakeProducer):
        def __init__(self, _conf: dict[str, Any]) -> None:
            super().__init__()
            self.broken = not made  # the first instance hits a fatal error
            made.append(self)

        def produce(self, *args: Any, **kwargs: Any) -> None:
            if self.broken:
                raise KafkaException(KafkaError(KafkaError._FATAL, "producer fenced", fatal=True))
            super().produce(*args, **kwargs)

    monkeypatch.setattr("confluent_kafka.Producer", Producer)
    store = filled(tmp_path, 4)
    server = Server(lambda h, _b: answer(h, 200))
    try:
        relay = relay_of(
            store, replace(FAST, topic="billable", bootstrap="127.0.0.1:1", webhook_url=server.url)
        )
        for _ in range(3):
            try:
                relay.round()
            except Exception:  # as Relay.run does: logged, next round
                pass
    finally:
        server.close()
    rows = outbox(store)
    by_webhook = sum(r["webhook_sent_ms"] is not None for r in rows)
    on_topic = sum(r["topic_sent_ms"] is not None for r in rows)
    assert (by_webhook, on_topic) == (len(rows), len(rows)), (
        f"after 3 rounds: webhook confirmed {by_webhook}, topic {on_topic} of {len(rows)} items; "
        f"{len(made)} producer(s) made"
    )


def test_an_answer_that_is_not_http_is_a_counted_failed_delivery(tmp_path: Path) -> None:
    """An answer that is not HTTP (webhook_url naming a port of another protocol) is a failed
    delivery, counted (KvmeterHandoffDeliveryFailing fires) and released with its error
    (http.client's BadStatusLine escaped the round: nothing counted, the rows left leased)."""
    store = filled(tmp_path, 2)
    raised: Exception | None = None
    with not_http("/items") as url:
        relay = relay_of(store, replace(FAST, webhook_url=url))
        try:
            relay.round()
        except Exception as exc:
            raised = exc
    errors = relay.metrics.registry.get_sample_value(
        "kvmeter_handoff_delivery_errors_total", {"sink": "webhook"}
    )
    rows = outbox(store)
    assert raised is None
    assert errors, [(r["last_error"], r["claimed_until_ms"]) for r in rows]
    assert all(r["last_error"] and r["claimed_until_ms"] is None for r in rows)
