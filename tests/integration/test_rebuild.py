"""`kvmeter rebuild` through the front door: a live `kvmeter collector` started from TOML fills a
SQLite store from a real broker (and `kvmeter ingest` adds events the topics never carried);
the rebuild replays topics and stored events into a new store, SQLite or PostgreSQL, and finds
no difference; a tampered live store shows in the diff; the live group's offsets never move.
The collector's start warns when the measures topic keeps less than the rebuild horizon."""

from __future__ import annotations

import sqlite3
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from kvmeter.collector.store import Store
from tests.collector_support import ACCT_A, ACCT_B, IP1, VM1, VM2, M, Stream, usage_event, wait_for
from tests.harness.kafka import FAST_GROUP_TOML, create_topic
from tests.harness.ports import free_port, wait_for_port
from tests.harness.processes import KVMETER
from tests.integration.test_consume_live import produce

pytestmark = pytest.mark.broker

MIN = 60_000
VM3 = "9b1f0000-0000-4000-8000-000000000vm3"  # its lifecycle reaches the store by a file only
TOKEN = "operator-token-0123456789"


def config_text(
    tmp_path: Path, bootstrap: str, topics: tuple[str, str], port: int, extra_kafka: str = ""
) -> str:
    return f"""
[store]
url = "sqlite:///{tmp_path}/live.db"
[kafka]
bootstrap = "{bootstrap}"
measures_topic = "{topics[0]}"
lifecycle_topic = "{topics[1]}"
group = "live-{topics[0]}"
{extra_kafka}
{FAST_GROUP_TOML}[usage]
window_seconds = 60
grace_seconds = 0
tick_seconds = 0.5
[api]
listen = "127.0.0.1:{port}"
token = "{TOKEN}"
"""


class Live:
    """`kvmeter collector --config FILE`, its log in a file."""

    def __init__(self, tmp_path: Path, text: str, port: int):
        self.port = port
        self.config = tmp_path / "collector.toml"
        self.config.write_text(text)
        self.log_path = tmp_path / "collector.log"
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                [*KVMETER, "collector", "--config", str(self.config)], stdout=out, stderr=subprocess.STDOUT
            )
        wait_for_port("127.0.0.1", self.port, 30, self.logs())

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> str:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return str(resp.read().decode())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            assert self.proc.wait(30) == 0, self.logs()


@pytest.fixture
def lives() -> Iterator[list[Live]]:
    started: list[Live] = []
    yield started
    for live in started:
        if live.proc.poll() is None:
            live.proc.kill()
            live.proc.wait(10)


def rebuild(config: Path, into: str, *more: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KVMETER, "rebuild", "--config", str(config), "--into", into, *more],
        capture_output=True,
        text=True,
        timeout=180,
    )


def committed(bootstrap: str, group: str, topic: str) -> list[int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        return [
            tp.offset for tp in consumer.committed([TopicPartition(topic, p) for p in range(2)], timeout=15)
        ]
    finally:
        consumer.close()


def test_rebuild_into_a_new_store_equals_live_and_shows_a_difference(
    kafka_bootstrap: str,
    unique_topic: Callable[..., str],
    tmp_path: Path,
    store_url: str,
    lives: list[Live],
) -> None:
    topics = (unique_topic("measures", partitions=2), unique_topic("cloudstack", partitions=2))
    base = (int(time.time() * 1000) // MIN - 40) * MIN  # forty minutes ago, on a window boundary
    live_db = f"sqlite:///{tmp_path}/live.db"
    # Events that reach the store by a file only (`kvmeter ingest`): no topic carries them.
    events_file = tmp_path / "vm3.jsonl"
    events_file.write_bytes(
        b"\n".join(usage_event(e, VM3, ACCT_B, base + 5 * MIN)[1] for e in ("VM.CREATE", "VM.START")) + b"\n"
    )
    port = free_port()
    text = config_text(tmp_path, kafka_bootstrap, topics, port)
    (tmp_path / "collector.toml").write_text(text)
    done = subprocess.run(
        [*KVMETER, "ingest", "--db", live_db, "--config", str(tmp_path / "collector.toml"), "--events",
         str(events_file)], capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    produce(
        kafka_bootstrap,
        topics[1],
        [
            usage_event("VM.CREATE", VM1, ACCT_A, base),
            usage_event("VM.START", VM1, ACCT_A, base + MIN),
            usage_event("NET.IPASSIGN", IP1, ACCT_A, base + 2 * MIN),
            usage_event("VM.STOP", VM1, ACCT_A, base + 20 * MIN),
            usage_event("VM.CREATE", VM2, ACCT_B, base),
            usage_event("VM.START", VM2, ACCT_B, base),
            (None, b'{"event": "VM.START"}'),  # poison: dead-lettered in both
        ],
    )
    s1, s2 = Stream("stream-h1", "h1"), Stream("stream-h2", "h2")
    vm2 = {"instance": VM2, "domain": "i-3-11-VM", "mac": "02:00:3a:7b:00:22", "address": "203.0.113.22"}
    vm3 = {"instance": VM3, "domain": "i-4-12-VM", "mac": "02:00:3a:7b:00:33", "address": "198.51.100.33"}
    first = s1.batch([M(base + 3 * MIN, base + 5 * MIN, 1200)])  # spans two windows
    produce(
        kafka_bootstrap,
        topics[0],
        [
            (b"h1", first),
            (b"h2", s2.batch([M(base + 6 * MIN, base + 7 * MIN, 3000, **vm2)])),  # type: ignore[arg-type]
            (b"h2", s2.batch([M(base + 10 * MIN, base + 11 * MIN, 777, **vm3)])),  # type: ignore[arg-type]
            (
                b"h1",
                s1.batch(
                    [
                        M(
                            base + 30 * MIN,
                            base + 31 * MIN,
                            50,
                            instance="",
                            domain="r-9-VM",
                            mac="02:00:99:00:00:09",
                            address="",
                        )
                    ]
                ),
            ),  # no owner: parked
            (b"h1", first),  # a duplicate
        ],
    )
    lives.append(Live(tmp_path, text, port))
    live = lives[0]
    store = Store(live_db)
    try:
        wait_for(
            lambda: store.marks() == {"stream-h1": 2, "stream-h2": 2}, 60, "the measures applied", live.logs
        )
        start = int(time.time() * 1000)
        wait_for(lambda: _finalized(store) >= start // MIN * MIN, 30, "a tick after the measures", live.logs)
    finally:
        store.close()
    live.stop()
    group = f"live-{topics[0]}"
    offsets = committed(kafka_bootstrap, group, topics[0])
    assert sum(o for o in offsets if o >= 0) == 5  # the live group committed everything it read

    done = rebuild(live.config, store_url, "--check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 difference(s) by account, usage type and window" in done.stdout
    assert "no difference" in done.stdout
    assert "live store: 8 raw lifecycle event(s)" in done.stderr  # 6 from the topic, 2 from the file
    assert "parked bytes: live 50, rebuilt 50" in done.stderr
    assert "dead letters: live 1, rebuilt 1" in done.stderr
    assert committed(kafka_bootstrap, group, topics[0]) == offsets  # the live group's offsets stay
    rebuilt = Store(store_url)
    try:
        billed = {k.account for k, q in rebuilt.net_usage().items() if k.resource == VM3 and q}
        assert billed == {ACCT_B}  # VM3's bytes and time: owned through the stored events
    finally:
        rebuilt.close()

    # Not into a store that holds anything: the same target again is refused.
    again = rebuild(live.config, store_url)
    assert again.returncode != 0
    assert "the target store is not empty" in again.stderr

    # A deliberate difference: the live store bills 7 bytes more for VM2 than the topics say.
    with sqlite3.connect(tmp_path / "live.db") as db:
        changed = db.execute(
            "UPDATE usage_records SET quantity = quantity + 7 WHERE resource = ? AND usage_type IN (4, 5)",
            (VM2,),
        ).rowcount
    assert changed == 1
    other = f"sqlite:///{tmp_path}/other-{uuid.uuid4().hex[:6]}.db"
    done = rebuild(live.config, other, "--check")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 difference(s)" in done.stdout
    (line,) = [row for row in done.stdout.splitlines() if ACCT_B in row]
    assert line.split()[-3:] == ["3007", "3000", "-7"]
    assert rebuild(live.config, f"sqlite:///{tmp_path}/third.db").returncode == 0  # no --check: reported only


def _finalized(store: Store) -> int:
    with store.read() as conn:
        return store.finalized_through(conn, lock=False)


def test_collector_warns_when_the_measures_topic_keeps_less_than_the_rebuild_horizon(
    kafka_bootstrap: str, unique_topic: Callable[..., str], tmp_path: Path, lives: list[Live]
) -> None:
    short = f"measures-{uuid.uuid4().hex[:10]}"
    create_topic(kafka_bootstrap, short, config={"retention.ms": str(6 * 3_600_000)})  # six hours
    lifecycle = unique_topic("cloudstack")
    (tmp_path / "short").mkdir()
    port = free_port()
    text = config_text(
        tmp_path / "short", kafka_bootstrap, (short, lifecycle), port, "rebuild_horizon_days = 35"
    )
    live = Live(tmp_path / "short", text, port)
    lives.append(live)
    wait_for(lambda: "less than the rebuild horizon" in live.logs(), 30, "the warning", live.logs)
    assert f"measures topic {short} keeps 0.25 day(s) of history (retention.ms 21600000)" in live.logs()
    assert f'kvmeter_rebuild_history_short{{topic="{short}"}} 1.0' in live.metrics()
    assert f'kvmeter_topic_retention_seconds{{topic="{short}"}} 21600.0' in live.metrics()

    # A topic that keeps 60 days: no warning.
    long = f"measures-{uuid.uuid4().hex[:10]}"
    create_topic(kafka_bootstrap, long, config={"retention.ms": str(60 * 86_400_000)})
    (tmp_path / "long").mkdir()
    port = free_port()
    text = config_text(
        tmp_path / "long", kafka_bootstrap, (long, lifecycle), port, "rebuild_horizon_days = 35"
    )
    calm = Live(tmp_path / "long", text, port)
    lives.append(calm)
    wait_for(lambda: "keeps 60 day(s) of history" in calm.logs(), 30, "the check", calm.logs)
    assert f'kvmeter_rebuild_history_short{{topic="{long}"}} 0.0' in calm.metrics()
    assert "rebuild horizon of" not in calm.logs()
