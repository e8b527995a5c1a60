"""The agent's publisher when the broker loses the idempotent producer's state, against a real
Kafka-protocol broker and a real `kvmeter collector` process.

The test broker (Tansu, memory storage) restarted on the same port comes back empty: it no longer
knows the producer id and answers every produce with UNKNOWN_PRODUCER_ID. For batches it never
saw, librdkafka bumps the epoch and retries forever without telling the application: the
publisher notices in librdkafka's statistics. For batches it was sent and never answered (the
broker frozen, then gone), librdkafka cannot retry without risking duplicates: a fatal error.
Either way the publisher re-creates the producer and re-sends what the spool holds. The restarted broker has
lost its topics too, so the collector is restarted against it after the batches it had already
consumed are billed: its store's stream marks are what keeps a re-sent batch from being billed
twice, and that is checked last by re-sending the whole spool.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmeter.agent.metrics import AgentMetrics
from kvmeter.agent.publish import Publisher
from kvmeter.agent.spool import Spool
from kvmeter.proto import pb
from tests.collector_support import ACCT_A, HOUR, VM1, M, Stream, usage_event, wait_for
from tests.harness.kafka import Broker, create_topic
from tests.harness.ports import free_port
from tests.harness.processes import wait_drained
from tests.integration.test_collector_crash import applied, billed
from tests.integration.test_consume_live import produce

pytestmark = pytest.mark.broker


class Collector:
    """`kvmeter collector` from a TOML file, restartable."""

    def __init__(self, workdir: Path, bootstrap: str, db: str, measures: str, lifecycle: str) -> None:
        self.config = workdir / "collector.toml"
        self.group = f"g-{measures}"
        self.config.write_text(
            f"""
[store]
url = "{db}"
[kafka]
bootstrap = "{bootstrap}"
measures_topic = "{measures}"
lifecycle_topic = "{lifecycle}"
group = "{self.group}"
[kafka.options]
"session.timeout.ms" = 6000
"heartbeat.interval.ms" = 500
[usage]
tick_seconds = 0.5
[api]
enabled = false
"""
        )
        self.log_path = workdir / "collector.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kvmeter", "collector", "--config", str(self.config)],
                stdout=log,
                stderr=log,
                env=dict(os.environ),
            )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            assert self.proc.wait(30) == 0, self.logs()
        self.proc = None

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


@pytest.mark.parametrize(("outage", "reason"), [("stopped", "unknown producer"), ("frozen", "fatal")])
def test_a_broker_that_lost_the_producer_state_still_gets_every_batch_billed_once(
    tmp_path: Path, outage: str, reason: str
) -> None:
    base = (int(time.time() * 1000) // HOUR - 1) * HOUR  # the last full hour: windows stay open
    port = free_port("127.0.0.1")
    broker = Broker(port=port, log_dir=tmp_path).start()
    bootstrap = broker.bootstrap
    measures, lifecycle = "measures", "cloudstack"
    events = [usage_event("VM.CREATE", VM1, ACCT_A, base - HOUR)]
    db = f"sqlite:///{tmp_path}/usage.db"
    collector = Collector(tmp_path, bootstrap, db, measures, lifecycle)
    stream = Stream("stream-h1", "h1")
    spool = Spool(tmp_path / "spool")
    metrics = AgentMetrics()
    publisher = Publisher(spool, bootstrap=bootstrap, topic=measures, key="h1", metrics=metrics)
    expected: dict[tuple[str, int], int] = {}

    def spool_poll(i: int) -> None:
        start = base + i * 10_000
        polled = [M(start, start + 10_000, 1000 + i, direction=pb.VM_TX, instance=VM1),
                  M(start, start + 10_000, 500_000 + i, direction=pb.VM_RX, instance=VM1)]  # fmt: skip
        for m in polled:
            key = (ACCT_A, 4 if m.direction == pb.VM_TX else 5)
            expected[key] = expected.get(key, 0) + m.nbytes
        spool.append(stream.stream_id, stream.seq + 1, stream.batch(polled), {"poll": i}, start)

    try:
        for topic in (measures, lifecycle):
            create_topic(bootstrap, topic)
        produce(bootstrap, lifecycle, events)
        collector.start()

        # 1. Delivered and billed while the first broker runs.
        for i in range(4):
            spool_poll(i)
            assert publisher.flush(30), publisher.last_error
        wait_for(lambda: applied(db) == 4, 60, "the first 4 batches applied", collector.logs)
        collector.stop()

        # 2. The next polls are spooled and handed to librdkafka while the broker is away
        #    ("stopped") or takes their produce request and never answers ("frozen").
        if outage == "stopped":
            broker.stop()
        else:
            assert broker.proc is not None
            broker.proc.send_signal(signal.SIGSTOP)
        for i in range(4, 8):
            spool_poll(i)
            publisher.service(0.2)
        assert publisher.in_flight() == 4
        assert [f.seq for f in spool.pending()] == [5, 6, 7, 8]
        if broker.proc is not None:
            broker.proc.kill()  # frozen with the batches unanswered, then gone
            broker.proc.wait(10)

        # 3. It comes back on the same port without its data: producer ids, topics, offsets.
        broker = Broker(port=port, log_dir=tmp_path).start()
        for topic in (measures, lifecycle):
            create_topic(bootstrap, topic)
        assert publisher.flush(90), publisher.last_error  # before: UNKNOWN_PRODUCER_ID forever
        assert spool.pending() == []
        assert publisher.recreated == 1
        assert metrics.registry.get_sample_value(
            "kvmeter_agent_producer_recreations_total", {"reason": reason}
        ) == 1.0  # fmt: skip
        collector.start()
        wait_for(lambda: applied(db) == 8, 60, "all 8 batches applied", collector.logs)
        wait_drained(bootstrap, collector.group, measures)
        assert billed(db) == expected

        # 4. The whole spool again (an ack file that lagged behind): the collector drops every
        #    batch it already has by (stream, seq); nothing is billed twice.
        spool.close()
        (tmp_path / "spool" / "ack.msgpack").unlink()
        spool = Spool(tmp_path / "spool")
        assert [f.seq for f in spool.pending()] == list(range(1, 9))
        again = Publisher(spool, bootstrap=bootstrap, topic=measures, key="h1")
        assert again.flush(30), again.last_error
        wait_drained(bootstrap, collector.group, measures)
        assert applied(db) == 8
        assert billed(db) == expected
        collector.stop()
    finally:
        collector.stop()
        spool.close()
        broker.stop()
