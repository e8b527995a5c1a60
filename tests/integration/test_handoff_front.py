"""The hand-off through the front door: a real `kvmeter collector` from a TOML file with
[handoff], a real broker and a real HTTP receiver. It is killed (-9) between finalization and
delivery twice, at the delicate instant (the topic confirmed items the outbox has not marked)
and in the middle of a webhook POST; after a clean run every transaction id has arrived on both
sinks, some more than once, and a receiver deduplicating by id counts every record once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from kvmeter.collector.schema import handoff_outbox
from kvmeter.collector.store import Store
from tests.collector_support import ACCT_A, M, Stream, usage_event, wait_for
from tests.collector_support import VM1 as VM
from tests.handoff_support import Receiver, net_per_key, topic_reader
from tests.harness.kafka import FAST_GROUP_TOML
from tests.integration.test_consume_live import produce

pytestmark = pytest.mark.broker
WINDOW_MS = 2000


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.pg)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/usage.db"
    return str(request.getfixturevalue("pg_database"))


def outbox(url: str) -> tuple[set[str], int]:
    """(every transaction id in the outbox, how many are pending); nothing before the schema."""
    store = Store(url)
    try:
        with store.read() as conn:
            rows = conn.execute(sa.select(handoff_outbox.c.transaction_id, handoff_outbox.c.sent_ms)).all()
    except (sa.exc.OperationalError, sa.exc.ProgrammingError):
        return set(), 0
    finally:
        store.close()
    return {r[0] for r in rows}, sum(1 for r in rows if r[1] is None)


def final_net(url: str) -> tuple[dict[tuple[object, ...], int], bool]:
    """Net quantity of each final record; whether every record is final."""
    store = Store(url)
    rows = store.usage(0, 2**62)
    store.close()
    return {tuple(r.key): r.quantity for r in rows if r.final and r.quantity}, all(r.final for r in rows)


def test_kill_9_between_finalization_and_delivery_every_id_arrives_once_in_effect(
    kafka_bootstrap: str, unique_topic: Callable[..., str], tmp_path: Path, db_url: str
) -> None:
    measures, lifecycle = unique_topic("measures"), unique_topic("cloudstack")
    items_topic = unique_topic("billable", partitions=2)
    base = (int(time.time() * 1000) // WINDOW_MS - 15) * WINDOW_MS  # 30 s ago: windows to finalize
    produce(
        kafka_bootstrap,
        lifecycle,
        [usage_event("VM.CREATE", VM, ACCT_A, base), usage_event("VM.START", VM, ACCT_A, base)],
    )
    stream = Stream("stream-h1", "h1")
    produce(
        kafka_bootstrap,
        measures,
        [(b"h1", stream.batch([M(base + i * 1000, base + i * 1000 + 1000, 1000 + i)])) for i in range(20)],
    )
    with Receiver() as receiver:
        config = tmp_path / "collector.toml"
        config.write_text(
            f"""
[store]
url = "{db_url}"
[kafka]
bootstrap = "{kafka_bootstrap}"
measures_topic = "{measures}"
lifecycle_topic = "{lifecycle}"
group = "g-{measures}"
{FAST_GROUP_TOML}[usage]
window_seconds = 2
grace_seconds = 0
tick_seconds = 0.2
[api]
enabled = false
[handoff]
topic = "{items_topic}"
webhook_url = "{receiver.url}"
webhook_headers = {{ Authorization = "Bearer billing-token" }}
timeout_seconds = 2
retry_attempts = 3
retry_initial_seconds = 0.05
retry_max_seconds = 0.2
lease_seconds = 3
poll_seconds = 0.2
batch_size = 5
"""
        )
        log_path = tmp_path / "collector.log"
        log = log_path.open("ab")

        def start(**env: str) -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                [sys.executable, "-m", "kvmeter", "collector", "--config", str(config)],
                stdout=log,
                stderr=log,
                env={**os.environ, **env},
            )

        def logs() -> str:
            return log_path.read_text(errors="replace")[-4000:]

        # 1. Killed by itself right after the broker confirmed its first items, before marking them.
        first = start(KVMETER_FAILPOINT="handoff-after-delivery:1")
        assert first.wait(90) == -signal.SIGKILL, logs()
        made, pending = outbox(db_url)
        assert made, "records were finalized into the outbox"
        assert pending == len(made), "nothing was marked sent"
        assert receiver.ids() == [], "killed before the webhook's turn"

        # 2. Killed from outside while a POST is in flight (the receiver holds its answer).
        receiver.hang.set()
        second = start()
        try:
            wait_for(lambda: len(receiver.ids()) > 0, 60, "a POST in flight", logs)
        finally:
            second.send_signal(signal.SIGKILL)
            second.wait(30)
        in_flight = receiver.ids()[0]
        receiver.hang.clear()
        receiver.release.set()

        # 3. The VM goes away; a clean run hands off everything, then stops on SIGTERM.
        end = (int(time.time() * 1000) // WINDOW_MS) * WINDOW_MS
        produce(
            kafka_bootstrap,
            lifecycle,
            [usage_event("VM.STOP", VM, ACCT_A, end), usage_event("VM.DESTROY", VM, ACCT_A, end)],
        )
        third = start()
        try:
            wait_for(
                lambda: final_net(db_url)[1] and time.time() * 1000 > end + 2 * WINDOW_MS,
                90,
                "all final",
                logs,
            )
            wait_for(lambda: outbox(db_url)[0] and outbox(db_url)[1] == 0, 90, "the outbox drained", logs)
        finally:
            third.send_signal(signal.SIGTERM)
            code = third.wait(30)
        log.close()
        assert code == 0, logs()

        made, pending = outbox(db_url)
        assert pending == 0
        net, _ = final_net(db_url)
        # The webhook: every id, the one in flight at the kill more than once, each counted once.
        posted = receiver.deduplicated()
        assert set(posted) == made
        assert receiver.ids().count(in_flight) >= 2
        assert net_per_key(posted) == net
        assert {h["authorization"] for _, _, h in receiver.posts} == {"Bearer billing-token"}
        # The topic: every id, those confirmed before the first kill twice, each counted once.
        with topic_reader(kafka_bootstrap, items_topic) as reader:
            wait_for(
                lambda: reader.poll() or set(reader.deduplicated()) == made, 60, "every item on the topic"
            )
            reader.poll(2)
            assert len(reader.records) > len(made), "the items confirmed before the kill came twice"
            assert all(key == ACCT_A == item["account"] for key, _, item in reader.records)
            assert net_per_key(reader.deduplicated()) == net
