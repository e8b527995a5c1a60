"""`usage.evict_closed_after_seconds` through the front door: `kvmeter collector --config FILE` on a
real broker, its effect read from the replica's own /metrics."""

from __future__ import annotations

import http.client
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Producer

from tests.collector_support import ACCT_A, HOUR, T0, usage_event
from tests.harness.kafka import FAST_GROUP_TOML, create_topic
from tests.harness.ports import free_port

pytestmark = pytest.mark.broker
VMS = 30


def _start(tmp: Path, bootstrap: str, topic: str, evict: str) -> tuple[subprocess.Popen[bytes], int, Path]:
    tmp.mkdir()
    port = free_port()
    config = tmp / "collector.toml"
    config.write_text(
        f"""
[store]
url = "sqlite:///{tmp}/usage.db"
[kafka]
bootstrap = "{bootstrap}"
measures_topic = "m-{topic}"
lifecycle_topic = "{topic}"
group = "g-{tmp.name}"
{FAST_GROUP_TOML}[usage]
tick_seconds = 0.5
evict_closed_after_seconds = {evict}
[api]
listen = "127.0.0.1:{port}"
"""
    )
    log = tmp / "collector.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvmeter", "collector", "--config", str(config)], stdout=out, stderr=out
        )
    return proc, port, log


def _gauges(port: int) -> dict[str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    except OSError:
        return {}
    finally:
        conn.close()
    found = re.findall(r"^(kvmeter_lifecycle_resources_\w+) (\S+)$", text, re.M)
    return {name: float(value) for name, value in found}


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        p.terminate()
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


def test_closed_resources_leave_memory_as_the_config_says(
    kafka_bootstrap: str, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    topic = f"l-{uuid.uuid4().hex[:10]}"
    create_topic(kafka_bootstrap, topic)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    for i in range(VMS):  # VMs of 2024, created and destroyed within the hour: long closed
        vm = f"9b1f0000-0000-4000-8000-{i:012d}"
        for kind, at in (("VM.CREATE", 0), ("VM.START", 1000), ("VM.DESTROY", HOUR)):
            key, value = usage_event(kind, vm, ACCT_A, T0 + i * HOUR + at)
            producer.produce(topic, value=value, key=key)
    assert producer.flush(30) == 0

    runs = {}
    for name, evict in (("evicting", "3600"), ("keeping", "false")):
        proc, port, log = _start(tmp_path / name, kafka_bootstrap, topic, evict)
        procs.append(proc)
        runs[name] = (port, log)
    want = {
        "evicting": {"kvmeter_lifecycle_resources_held": 0.0, "kvmeter_lifecycle_resources_evicted": VMS},
        "keeping": {"kvmeter_lifecycle_resources_held": VMS, "kvmeter_lifecycle_resources_evicted": 0.0},
    }
    deadline = time.monotonic() + 60
    for name, (port, log) in runs.items():
        while _gauges(port) != want[name]:
            assert time.monotonic() < deadline, (name, _gauges(port), log.read_text()[-3000:])
            time.sleep(0.5)
    # The owner hints and witness it holds are exported too (no measure batch came: none).
    for port, _ in runs.values():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        held = dict(re.findall(r"^(kvmeter_(?:owner_hints|domain_witness)_held) (\S+)$", text, re.M))
        assert held == {"kvmeter_owner_hints_held": "0.0", "kvmeter_domain_witness_held": "0.0"}
