"""Retention through the front door: `kvmeter prune --dry-run`, and the real `kvmeter collector`
and `kvmeter run --all-in-one` from TOML files with short ages, pruning a store's old month while
they go on ingesting."""

from __future__ import annotations

import http.client
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kvmeter.collector.store import Store
from tests.collector_support import ACCT_B, HOUR, MIN, Clock, M, Stream, usage_event
from tests.harness import kafka
from tests.harness.netns import Host
from tests.harness.ports import free_port
from tests.harness.processes import AllInOneProcess
from tests.integration.test_collector_api_front import CollectorProcess, collectors  # noqa: F401
from tests.integration.test_consume_live import produce
from tests.retention_support import VM2, VM5, event_resources, feed, month, row_counts

pytestmark = pytest.mark.broker

VM8 = "9b1f0000-0000-4000-8000-000000000vm8"
# A month that ended two days ago by the wall clock: its open resources grow two days, not years.
MONTH_START = (int(time.time() * 1000) - 32 * 24 * HOUR) // HOUR * HOUR
RETENTION = """
[retention]
lifecycle_events_days = 1
parked_measures_days = 1
quarantined_measures_days = 1
stream_marks_days = 1
interval_seconds = 0.5
batch_rows = 2
"""


def metric(port: int, name: str, kind: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    found = re.search(rf'^{name}\{{kind="{kind}"\}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def prune_command(config: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "kvmeter", "prune", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_collector_prunes_an_old_month_while_it_ingests(
    kafka_bootstrap: str,
    tmp_path: Path,
    collectors: list[CollectorProcess],  # noqa: F811
) -> None:
    store = Store(f"sqlite:///{tmp_path}/usage.db")  # the file the collector's config names
    store.migrate()
    feed(store, Clock(0), month(MONTH_START))  # ended two days ago
    billed = store.net_usage()
    before = row_counts(store)
    for topic in (f"m-{tmp_path.name}", f"l-{tmp_path.name}"):
        kafka.create_topic(kafka_bootstrap, topic, 1)
    port = free_port()
    config = tmp_path / "collector.toml"  # what CollectorProcess writes, for the command first
    config.write_text(f'[store]\nurl = "sqlite:///{tmp_path}/usage.db"\n{RETENTION}')

    dry = prune_command(config, "--dry-run")
    assert re.search(r"^lifecycle_events +would delete 6$", dry, re.M), dry  # VM1, IP1
    assert re.search(r"^quarantined_measures +would delete 1$", dry, re.M), dry
    assert re.search(r"^usage_records +kept forever$", dry, re.M), dry
    assert row_counts(store) == before

    collectors.append(
        c := CollectorProcess(tmp_path, kafka_bootstrap, f'listen = "127.0.0.1:{port}"', extra=RETENTION)
    )
    now = int(time.time() * 1000)
    live = Stream("stream-live", "hl")
    produce(
        kafka_bootstrap,
        f"l-{tmp_path.name}",
        [usage_event("VM.CREATE", VM8, ACCT_B, now - HOUR), usage_event("VM.START", VM8, ACCT_B, now - HOUR)],
    )
    produce(
        kafka_bootstrap,
        f"m-{tmp_path.name}",
        [(b"hl", live.batch([M(now - 2 * MIN, now - MIN, 4242, instance=VM8)]))],
    )

    def pruned_and_ingested() -> bool:
        return (
            store.marks() == {"stream-live": 1}
            and event_resources(store) >= {VM8}
            and not event_resources(store)
            & {"9b1f0000-0000-4000-8000-000000000vm1", "41aa0000-0000-4000-8000-0000000000ip1"}
            and store.quarantined_rows() == []
        )

    deadline = time.monotonic() + 90
    while not pruned_and_ingested():
        assert c.proc.poll() is None, c.log()[-3000:]
        assert time.monotonic() < deadline, c.log()[-3000:]
        time.sleep(0.5)
    # Ingestion goes on beside the passes.
    produce(
        kafka_bootstrap, f"m-{tmp_path.name}", [(b"hl", live.batch([M(now - MIN, now, 58, instance=VM8)]))]
    )
    deadline = time.monotonic() + 60
    while store.marks().get("stream-live") != 2:
        assert time.monotonic() < deadline, c.log()[-3000:]
        time.sleep(0.5)
    vm8_bytes = sum(v for k, v in store.net_usage().items() if k.resource == VM8 and k.usage_type == 4)
    assert vm8_bytes == 4242 + 58
    # VM2's history is open, VM5's still explains a parked measure: both kept. The old month's
    # usage is as it was billed (usage is kept for good).
    assert event_resources(store) >= {VM2, VM5}
    assert {k: v for k, v in store.net_usage().items() if k in billed} == billed
    assert metric(port, "kvmeter_pruned_rows_total", "lifecycle_events") >= 6
    assert metric(port, "kvmeter_pruned_rows_total", "quarantined_measures") == 1
    assert "prune: " in c.log()
    c.stop()
    again = prune_command(c.config)
    assert re.search(r"^lifecycle_events +deleted 0$", again, re.M), again
    store.close()


@pytest.mark.netns
@pytest.mark.libvirt
def test_the_all_in_one_prunes_its_store_while_its_agent_meters(
    netns_host: Callable[..., Host], tmp_path: Path
) -> None:
    host = netns_host("ret")
    proc = AllInOneProcess(host, tmp_path, poll=1.0, extra=RETENTION)
    store = Store(proc.db)
    store.migrate()
    feed(store, Clock(0), month(MONTH_START))  # ended two days ago
    before = row_counts(store)
    vm = host.add_vm(
        "i-2-10-VM",
        "a1100000-0000-4000-8000-000000000010",
        [("cloudbr0", "02:00:0a:00:00:10", "198.51.100.10/24")],
    )
    host.write_libvirt_xml(proc.libvirt_xml, {})
    proc.start()
    try:
        proc.wait_polled()
        deadline = time.monotonic() + 60
        while (
            store.quarantined_rows() or row_counts(store)["lifecycle_events"] > before["lifecycle_events"] - 6
        ):
            assert time.monotonic() < deadline, proc.logs()
            vm.send("198.51.100.1", 5_000)
            time.sleep(0.5)
        marks = store.marks()
        assert set(marks) & {"stream-h1", "stream-h2", "stream-h3", "stream-h4"} == set()
        seq = sum(marks.values())  # the agent's own stream goes on
        deadline = time.monotonic() + 30
        while sum(store.marks().values()) <= seq:
            assert time.monotonic() < deadline, proc.logs()
            vm.send("198.51.100.1", 5_000)
            time.sleep(0.5)
        assert proc.terminate() == 0, proc.logs()
    finally:
        proc.stop()
    assert "prune: " in proc.logs()
    assert event_resources(store) >= {VM2, VM5}
    # The command reads an all-in-one's file too: its [store] and [retention].
    after = prune_command(proc.config, "--dry-run")
    assert re.search(r"^quarantined_measures +would delete 0$", after, re.M), after
    store.close()


def test_prune_refuses_a_policy_that_drops_usage_before_its_events(tmp_path: Path) -> None:
    config = tmp_path / "collector.toml"
    config.write_text(f'[store]\nurl = "sqlite:///{tmp_path}/usage.db"\n[retention]\nusage_days = 30\n')
    done = subprocess.run(
        [sys.executable, "-m", "kvmeter", "prune", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert (
        "retention.lifecycle_events_days: longer than usage_days (final usage is kept longest)" in done.stderr
    )
    assert not (tmp_path / "usage.db").exists()  # refused before the store was opened
