"""A billing system's receivers for the hand-off tests: a real HTTP server on loopback that
records every POST (and can fail or hang on purpose), and a Kafka reader of the items topic.
Both deduplicate by transaction id, as a billing system would."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from kvmeter.collector.store import Store
from kvmeter.collector.store import outbox as store_outbox


class Receiver:
    """Records every POST: (transaction id from the Idempotency-Key header, item, headers).
    fail_first: answer 503 to the first N POSTs of each id (after recording them: an ack that
    got lost); hang: hold each answer until `release` is set."""

    def __init__(self, *, fail_first: int = 0, secret: str = ""):
        self.fail_first = fail_first
        self.secret = secret
        self.posts: list[tuple[str, dict[str, Any], dict[str, str]]] = []
        self.hang = threading.Event()  # set: hold answers
        self.release = threading.Event()
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                tid = self.headers.get("Idempotency-Key", "")
                headers = {k.lower(): v for k, v in self.headers.items()}
                with receiver.lock:
                    receiver.posts.append((tid, json.loads(body), headers))
                    tries = sum(1 for t, _, _ in receiver.posts if t == tid)
                if receiver.secret:
                    want = "sha256=" + hmac.new(receiver.secret.encode(), body, hashlib.sha256).hexdigest()
                    if headers.get("x-kvmeter-signature") != want:
                        self._answer(401)
                        return
                if receiver.hang.is_set():
                    receiver.release.wait(60)
                self._answer(503 if tries <= receiver.fail_first else 200)

            def _answer(self, status: int) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:  # the sender is gone (killed): its ack is lost
                    pass

            def log_message(self, *_args: Any) -> None:
                return

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/items"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def ids(self) -> list[str]:
        with self.lock:
            return [t for t, _, _ in self.posts]

    def deduplicated(self) -> dict[str, dict[str, Any]]:
        """Each item once, by transaction id (the first copy)."""
        with self.lock:
            out: dict[str, dict[str, Any]] = {}
            for tid, item, _ in self.posts:
                out.setdefault(tid, item)
            return out

    def duplicates(self) -> int:
        return sum(n - 1 for n in Counter(self.ids()).values())


@contextmanager
def topic_reader(bootstrap: str, topic: str) -> Iterator[TopicReader]:
    reader = TopicReader(bootstrap, topic)
    try:
        yield reader
    finally:
        reader.close()


class TopicReader:
    """Reads the items topic from the beginning: (key, transaction id header, item) each."""

    def __init__(self, bootstrap: str, topic: str):
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"billing-{uuid.uuid4().hex[:8]}",  # never joined: assign() below
                "enable.auto.commit": False,
            }
        )
        # every partition from its start, without a group's join (about 20 s on the test broker)
        partitions = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        self.records: list[tuple[str, str, dict[str, Any]]] = []

    def poll(self, seconds: float = 1.0) -> None:
        for msg in self.consumer.consume(1000, seconds):
            if msg.error():
                continue
            headers = dict(msg.headers() or [])
            self.records.append(
                (msg.key().decode(), headers["transaction_id"].decode(), json.loads(msg.value()))
            )

    def deduplicated(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for _, tid, item in self.records:
            out.setdefault(tid, item)
        return out

    def close(self) -> None:
        self.consumer.close()


def net_per_key(items: dict[str, dict[str, Any]]) -> dict[tuple[Any, ...], int]:
    """What a billing system that deduplicates by id bills per record: its quantity as
    finalized plus every adjustment."""
    out: dict[tuple[Any, ...], int] = {}
    for item in items.values():
        key = (item["account"], item["usage_type"], item["resource"], item["offering"], item["traffic_type"],
               item["start_ms"], item["end_ms"])  # fmt: skip
        out[key] = out.get(key, 0) + item["quantity"]
    return out


def pick_plans(store: Store, sink: str, limit: int, now_ms: int) -> list[list[str]]:
    """The query plan of each query a claim's pick for `sink` runs (store/outbox.py _pick, as a
    claim runs them: captured, then explained by the database), one list of lines per query."""
    plans = []
    with store.read() as conn:
        captured: list[Any] = []

        class Spy:
            dialect = conn.dialect

            def execute(self, query: Any) -> list[Any]:
                captured.append(query)
                return []

        store_outbox._pick(Spy(), sink, limit, now_ms)  # type: ignore[arg-type]
        explain = "EXPLAIN " if store.is_postgres else "EXPLAIN QUERY PLAN "
        for query in captured:
            sql = str(query.compile(conn, compile_kwargs={"literal_binds": True}))
            plans.append([str(row[-1]) for row in conn.execute(sa.text(explain + sql))])
    return plans
