"""`kill -9` of a real `kvmeter collector` process, at the delicate instant (database committed,
offsets not yet) and at an arbitrary one mid-stream; after restarts every byte is billed once."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from kvmeter.collector.store import Store, engine_url, stream_marks
from kvmeter.proto import pb
from tests.collector_support import ACCT_A, ACCT_B, HOUR, VM1, VM2, M, Stream, usage_event
from tests.harness.ports import free_port
from tests.integration.test_consume_live import produce, wait_for

pytestmark = pytest.mark.broker

BATCHES_PER_STREAM = 120
MEASURES_PER_BATCH = 25


def build(
    base: int,
) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]], dict[tuple[str, int], int]]:
    """Events, measure records and the bytes each (account, usage type) must be billed."""
    rng = random.Random(7)
    events = [
        usage_event("VM.CREATE", VM1, ACCT_A, base - HOUR),
        usage_event("VM.CREATE", VM2, ACCT_B, base - HOUR),
    ]
    expected: dict[tuple[str, int], int] = {}
    records = []
    for host, vm, account in (("h1", VM1, ACCT_A), ("h2", VM2, ACCT_B)):
        stream = Stream(f"stream-{host}", host)
        for i in range(BATCHES_PER_STREAM):
            measures = []
            for j in range(MEASURES_PER_BATCH):
                start = base + (i * MEASURES_PER_BATCH + j) * 1000
                direction = pb.VM_TX if j % 2 else pb.VM_RX
                nbytes = rng.randrange(1, 10**7)
                measures.append(M(start, start + 1000, nbytes, direction=direction, instance=vm))
                usage_type = 4 if direction == pb.VM_TX else 5
                expected[(account, usage_type)] = expected.get((account, usage_type), 0) + nbytes
            records.append((host.encode(), stream.batch(measures)))
    return events, records, expected


def http_get(port: int, path: str, token: str | None = "crash-test-token-0123") -> bytes:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return bytes(resp.read())
    except OSError:
        return b""


def billed(url: str) -> dict[tuple[str, int], int]:
    store = Store(url)
    out: dict[tuple[str, int], int] = {}
    for key, quantity in store.net_usage().items():
        if key.usage_type in (4, 5):
            out[(key.account, key.usage_type)] = out.get((key.account, key.usage_type), 0) + quantity
    store.close()
    return out


def applied(url: str) -> int:
    """Batches applied so far (the sum of the stream marks); 0 before the schema exists."""
    engine = sa.create_engine(engine_url(url))
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(sa.select(sa.func.coalesce(sa.func.sum(stream_marks.c.seq), 0))).scalar() or 0
            )
    except (sa.exc.OperationalError, sa.exc.ProgrammingError):  # schema not created yet
        return 0
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.pg)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/usage.db"
    return str(request.getfixturevalue("pg_database"))


def test_kill_9_mid_stream_bills_nothing_twice_and_loses_nothing(
    kafka_bootstrap: str, unique_topic: Callable[..., str], tmp_path: Path, db_url: str
) -> None:
    base = (int(time.time() * 1000) // HOUR - 1) * HOUR  # the last full hour: windows stay open
    events, records, expected = build(base)
    measures, lifecycle = unique_topic("measures", partitions=2), unique_topic("cloudstack")
    produce(kafka_bootstrap, lifecycle, events)
    produce(kafka_bootstrap, measures, records)
    config = tmp_path / "collector.toml"
    port = free_port()
    text = f"""
[store]
url = "{db_url}"
[kafka]
bootstrap = "{kafka_bootstrap}"
measures_topic = "{measures}"
lifecycle_topic = "{lifecycle}"
group = "g-{measures}"
batch_size = 2
[kafka.options]
"session.timeout.ms" = 6000
"heartbeat.interval.ms" = 500
[usage]
tick_seconds = 0.5
[api]
enabled = false
listen = "127.0.0.1:{port}"
token = "crash-test-token-0123"
"""
    config.write_text(text)
    total = len(records)
    log = (tmp_path / "collector.log").open("ab")

    def start(**env: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "kvmeter", "collector", "--config", str(config)],
            stdout=log,
            stderr=log,
            env={**os.environ, **env},
        )

    # 1. Killed by itself right after its 4th database commit, before storing those offsets.
    first = start(KVMETER_FAILPOINT="after-db-commit:4")
    assert first.wait(90) == -signal.SIGKILL
    after_first = applied(db_url)
    assert 0 < after_first < total

    # 2. Killed from outside as soon as it makes progress again: mid-stream, likely mid-transaction.
    second = start()
    try:
        deadline = time.monotonic() + 60
        while applied(db_url) <= after_first:  # polled tightly: the kill lands early in the run
            assert time.monotonic() < deadline, "no progress after the first restart"
            time.sleep(0.005)
    finally:
        second.send_signal(signal.SIGKILL)
        second.wait(30)
    assert applied(db_url) < total

    # 3. Runs to the end, serves its API meanwhile, and stops cleanly on SIGTERM.
    config.write_text(text.replace("enabled = false", "enabled = true"))
    third = start()
    try:
        wait_for(lambda: applied(db_url) == total, 90, "every batch applied")
        wait_for(lambda: b"kvmeter_consumer_lag{" in http_get(port, "/metrics"), 30, "lag measured")
        metrics = http_get(port, "/metrics").decode()
        assert 'kvmeter_consumer_lag{partition="0"' in metrics
        assert "kvmeter_store_dead_letters 0.0" in metrics
        health = json.loads(http_get(port, "/health", token=None))
        assert health["status"] == "ok"
        assert health["consumer"]["measures_partitions"] == [0, 1]  # the only replica: all of them
        assert health["consumer"]["failing"] == ""
        usage = json.loads(http_get(port, f"/v1/usage?start={base}&end={base + HOUR}"))["usage"]
        via_api: dict[tuple[str, int], int] = {}
        for r in usage:
            if r["usage_type"] in (4, 5):
                via_api[(r["account"], r["usage_type"])] = (
                    via_api.get((r["account"], r["usage_type"]), 0) + r["quantity"]
                )
        assert via_api == expected
    finally:
        third.send_signal(signal.SIGTERM)
        code = third.wait(30)
    log.close()
    assert code == 0, (tmp_path / "collector.log").read_text()[-3000:]
    assert billed(db_url) == expected
