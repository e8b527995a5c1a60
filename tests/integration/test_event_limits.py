"""The lifecycle event size limit through the front door: `kvmeter collector` and
`kvmeter run --all-in-one` started from TOML files holding `[lifecycle] max_event_bytes`. An
event over it (but far under the 1 MiB default) is dead-lettered with its bytes; the events
around it are stored and billed."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Producer

from kvmeter.collector.model import ALLOCATED_VM
from kvmeter.collector.store import Store
from tests.collector_support import ACCT_A, ACCT_B, VM1, VM2, usage_event, wait_for
from tests.harness.netns import Host
from tests.harness.processes import AllInOneProcess, CollectorProcess

LIMIT = 2048


def lifecycle(now_ms: int) -> tuple[list[tuple[bytes, bytes]], dict[str, bytes]]:
    """Good events (VM1, VM2 created) and bad ones about VM2, keyed as the event bus keys them."""
    good = [
        usage_event("VM.CREATE", VM1, ACCT_A, now_ms - 60_000),
        usage_event("VM.CREATE", VM2, ACCT_B, now_ms - 30_000),
    ]
    start = json.loads(usage_event("VM.START", VM2, ACCT_B, now_ms - 20_000)[1])
    bad = {
        "oversized_event": json.dumps({**start, "description": "x" * (LIMIT + 100)}).encode(),
        "wrong_type": json.dumps({**start, "account": 123}).encode(),
    }
    return good, bad


def check_store(store: Store, bad: dict[str, bytes]) -> None:
    letters = {(r["source"], r["reason"], bytes(r["raw"])) for r in store.dead_letter_rows()}
    assert letters == {("lifecycle", reason, raw) for reason, raw in bad.items()}
    allocated = {(k.account, k.resource) for k in store.net_usage() if k.usage_type == ALLOCATED_VM}
    assert allocated == {(ACCT_A, VM1), (ACCT_B, VM2)}
    assert all(k.account in (ACCT_A, ACCT_B) for k in store.net_usage())


@pytest.mark.broker
def test_the_collectors_toml_sets_the_event_size_limit(
    kafka_bootstrap: str, unique_topic: Callable[..., str], tmp_path: Path
) -> None:
    measures, topic = unique_topic("measures"), unique_topic("cloudstack")
    good, bad = lifecycle(int(time.time() * 1000))
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for key, value in [good[0], *((VM2.encode(), raw) for raw in bad.values()), good[1]]:
        producer.produce(topic, value=value, key=key)
    assert producer.flush(30) == 0
    db = f"sqlite:///{tmp_path}/usage.db"
    proc = CollectorProcess(
        "collector", tmp_path, db=db, bootstrap=kafka_bootstrap, measures=measures, lifecycle=topic,
        group=f"g-{measures}", max_event_bytes=LIMIT,
    )  # fmt: skip
    assert f"max_event_bytes = {LIMIT}" in proc.config.read_text()
    proc.start()
    try:
        store = Store(db)
        wait_for(lambda: _ready(store, len(bad)), 60, "the events applied", proc.logs)
        assert proc.terminate() == 0, proc.logs()
        check_store(store, bad)
        store.close()
    finally:
        proc.stop()


@pytest.mark.netns
@pytest.mark.libvirt
def test_the_all_in_ones_toml_sets_the_event_size_limit(
    netns_host: Callable[..., Host], tmp_path: Path
) -> None:
    host = netns_host("lim")
    proc = AllInOneProcess(host, tmp_path, max_event_bytes=LIMIT)
    assert f"max_event_bytes = {LIMIT}" in proc.config.read_text()
    good, bad = lifecycle(int(time.time() * 1000))
    proc.events.write_bytes(b"\n".join([good[0][1], *bad.values(), good[1][1]]) + b"\n")
    host.write_libvirt_xml(proc.libvirt_xml, {})
    proc.start()
    try:
        proc.wait_polled()
        store = Store(proc.db)
        wait_for(lambda: _ready(store, len(bad)), 30, "the events applied", proc.logs)
        assert proc.terminate() == 0, proc.logs()
        check_store(store, bad)
        store.close()
    finally:
        proc.stop()


def _ready(store: Store, letters: int) -> bool:
    try:
        allocated = {k.resource for k in store.net_usage() if k.usage_type == ALLOCATED_VM}
        return len(store.dead_letter_rows()) >= letters and allocated == {VM1, VM2}
    except Exception:
        return False
