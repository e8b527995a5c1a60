"""kvmeter's own processes for whole-pipeline tests: agents inside simulated hosts, collectors
in the root namespace. Each writes its config into a work dir and logs next to it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from tests.harness.kafka import FAST_GROUP_TOML
from tests.harness.netns import Host

KVMETER = [sys.executable, "-m", "kvmeter"]


class Process:
    """One kvmeter process that can be started again, killed with SIGKILL or stopped with SIGTERM."""

    def __init__(self, name: str, workdir: Path, prefix: Sequence[str] = ()):
        self.name = name
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.prefix = list(prefix)
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    def args(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        self.runs += 1
        with open(self.workdir / f"{self.name}-{self.runs}.log", "wb") as log:
            self.proc = subprocess.Popen([*self.prefix, *self.args()], stdout=log, stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(
            f"--- {p.name}\n" + p.read_text(errors="replace")[-tail:]
            for p in sorted(self.workdir.glob(f"{self.name}-*.log"))
        )


class Spooling(Process):
    """A process with an agent inside: its spool tells when it has polled."""

    state_dir: Path

    def spooled(self) -> int:
        return sum(p.stat().st_size for p in (self.state_dir / "spool").glob("seg-*.kvs"))

    def wait_polled(self, timeout: float = 20.0) -> None:
        """Until this run has spooled a new batch (so its first poll is behind it)."""
        start = self.spooled()
        deadline = time.monotonic() + timeout
        while self.spooled() <= start:
            if not self.alive() or time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not poll:\n{self.logs()}")
            time.sleep(0.1)


class AgentProcess(Spooling):
    """`kvmeter agent` inside a simulated host's namespace; its inventory is libvirt's test
    driver on `libvirt_xml`, or the real libvirtd at `libvirt_uri`.

    $KVMETER_AGENT_PYTHON runs it under another interpreter (e.g. EL9's 3.9)."""

    def __init__(
        self,
        host: Host,
        workdir: Path,
        *,
        bootstrap: str,
        topic: str,
        poll: float = 1.0,
        metrics_port: int | None = None,
        libvirt_uri: str | None = None,
    ):
        super().__init__("agent", workdir, host.exec_args())
        self.python = os.environ.get("KVMETER_AGENT_PYTHON", sys.executable)
        self.state_dir = workdir / "state"
        self.libvirt_xml = workdir / "node.xml"
        self.config = workdir / "agent.toml"
        metrics = f"port = {metrics_port}" if metrics_port else "enabled = false"
        uri = libvirt_uri or f"test://{self.libvirt_xml}"
        self.config.write_text(
            f"""
[agent]
host_id = "{host.name}"
poll_interval = {poll}
state_dir = "{self.state_dir}"
log_level = "info"
[libvirt]
uri = "{uri}"
[kafka]
bootstrap_servers = "{bootstrap}"
topic = "{topic}"
[metrics]
{metrics}
"""
        )

    def args(self) -> list[str]:
        return [self.python, "-m", "kvmeter", "agent", "--config", str(self.config)]


class CollectorProcess(Process):
    """`kvmeter collector`: a replica in a consumer group, writing to `db`."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        *,
        db: str,
        bootstrap: str,
        measures: str,
        lifecycle: str,
        group: str,
        window_seconds: int = 3600,
        billable: Sequence[str] = ("public",),
        max_event_bytes: int | None = None,
        extra: str = "",
    ):
        super().__init__(name, workdir)
        self.config = workdir / f"{name}.toml"
        types = ", ".join(f'"{t}"' for t in billable)
        self.config.write_text(
            f"""
[store]
url = "{db}"
[kafka]
bootstrap = "{bootstrap}"
measures_topic = "{measures}"
lifecycle_topic = "{lifecycle}"
group = "{group}"
{FAST_GROUP_TOML}[usage]
window_seconds = {window_seconds}
tick_seconds = 1
billable_traffic_types = [{types}]
[api]
enabled = false
"""
            + ("" if max_event_bytes is None else f"[lifecycle]\nmax_event_bytes = {max_event_bytes}\n")
            + extra
        )

    def args(self) -> list[str]:
        return [*KVMETER, "collector", "--config", str(self.config)]


def group_lag(bootstrap: str, group: str, topic: str, timeout: float = 30.0) -> int:
    """Messages of `topic` after the consumer group's committed offsets (all partitions),
    counted by reading them: a broker's own idea of a partition's end (ListOffsets) may lag
    behind (Tansu's points after the first record of the last producer batch), the end a
    fetch reaches does not."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,  # for its committed offsets; assign() below never joins or commits
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        tps = [TopicPartition(topic, p) for p in partitions]
        starts = [
            TopicPartition(topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING)
            for tp in consumer.committed(tps, timeout=10)
        ]
        consumer.assign(starts)
        lag, at_end = 0, set()
        deadline = time.monotonic() + timeout
        while len(at_end) < len(starts):
            if time.monotonic() > deadline:
                raise AssertionError(f"reading {topic} to its end took over {timeout} s")
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error() is None:
                lag += 1
            elif msg.error().code() == KafkaError._PARTITION_EOF:
                at_end.add(msg.partition())
            else:
                raise AssertionError(f"reading {topic}: {msg.error()}")
        return lag
    finally:
        consumer.close()


def wait_drained(bootstrap: str, group: str, topic: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    lag = -1
    while time.monotonic() < deadline:
        lag = group_lag(bootstrap, group, topic)
        if lag == 0:
            return
        time.sleep(0.5)
    raise AssertionError(f"group {group} still {lag} messages behind on {topic}")


class AllInOneProcess(Spooling):
    """`kvmeter run --all-in-one` inside a simulated host: agent and collector on one SQLite file."""

    def __init__(
        self,
        host: Host,
        workdir: Path,
        *,
        poll: float = 1.0,
        billable: Sequence[str] = ("public",),
        max_event_bytes: int | None = None,
        extra: str = "",
    ):
        super().__init__("allinone", workdir, host.exec_args())
        self.state_dir = workdir / "agent"
        self.libvirt_xml = workdir / "node.xml"
        self.events = workdir / "events.jsonl"
        self.db = f"sqlite:///{workdir / 'usage.db'}"
        self.config = workdir / "allinone.toml"
        types = ", ".join(f'"{t}"' for t in billable)
        self.config.write_text(
            f"""
[agent]
host_id = "{host.name}"
poll_interval = {poll}
state_dir = "{self.state_dir}"
[libvirt]
uri = "test://{self.libvirt_xml}"
[metrics]
enabled = false
[store]
url = "{self.db}"
[usage]
window_seconds = 60
tick_seconds = 1
billable_traffic_types = [{types}]
[api]
enabled = false
[lifecycle]
events_file = "{self.events}"
"""
            + ("" if max_event_bytes is None else f"max_event_bytes = {max_event_bytes}\n")
            + extra
        )

    def args(self) -> list[str]:
        return [*KVMETER, "run", "--all-in-one", "--config", str(self.config)]
