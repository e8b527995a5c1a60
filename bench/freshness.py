"""Freshness: time from bytes crossing a VM's veth to their appearance in the usage API.

The real `kvmeter run --all-in-one` (agent, in-process collector on SQLite, HTTP API) runs in a
simulated host namespace with one CloudStack VM (libvirt's test driver describes it; its tap is a
real veth). Each sample: wait a part of the poll interval (so that samples fall at evenly spread
phases of the poll cycle), read the VM's NETWORK_BYTES_SENT from the API, send one raw frame from the VM
end of the veth, then ask the API every PROBE_S until the frame's bytes show. The figure is the
time from the frame's send to the first answer that shows it (PROBE_S is its resolution).
"""

from __future__ import annotations

import http.client
import json
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.frames import ETHERTYPE, in_netns
from bench.timing import percentile
from bench.vethns import BRIDGE_MAC, VethHost

KVMETER = Path(sys.executable).with_name("kvmeter")
VM_UUID = "6f1c6c4e-0000-4000-8000-00000000f2e5"
VM_NAME = "i-2-42-VM"
ACCOUNT = "5a1ce000-0000-4000-8000-00000000a11c"
FRAME_BYTES = 1000
PROBE_S = 0.02


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _agent_toml(work: Path, uri: str, interval: float) -> str:
    """The [agent], [libvirt] and [metrics] sections both pipelines share."""
    return f"""[agent]
host_id = "bench-fresh"
poll_interval = {interval}
state_dir = "{work / "agent"}"
log_level = "warning"
[libvirt]
uri = "{uri}"
[metrics]
enabled = false
"""


def _config(work: Path, uri: str, interval: float, api_port: int) -> Path:
    path = work / "allinone.toml"
    path.write_text(
        _agent_toml(work, uri, interval)
        + f"""[store]
url = "sqlite:///{work / "usage.db"}"
[usage]
billable_traffic_types = ["public", "guest"]
[api]
listen = "127.0.0.1:{api_port}"
[lifecycle]
events_file = "events.jsonl"
"""
    )
    return path


class Api:
    """A keep-alive HTTP connection to the API, opened inside the host namespace."""

    def __init__(self, ns: str, port: int) -> None:
        self.ns, self.port = ns, port
        self.conn: http.client.HTTPConnection | None = None

    def sent_bytes(self) -> int:
        now = int(time.time() * 1000)
        path = f"/v1/usage?start={now - 2 * 3_600_000}&end={now + 3_600_000}&resource={VM_UUID}&type=4"
        for attempt in range(2):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                    with in_netns(self.ns):
                        self.conn.connect()
                self.conn.request("GET", path)
                response = self.conn.getresponse()
                body = response.read()
                if response.status != 200:
                    raise RuntimeError(f"API answered {response.status}: {body[:200]!r}")
                return sum(int(r["quantity"]) for r in json.loads(body)["usage"])
            except (OSError, http.client.HTTPException):
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def _work(interval: float) -> tuple[Path, str, list[bytes]]:
    """A work directory with libvirt's node file (the VM) and the VM's lifecycle records."""
    from tests.harness.libvirt_node import Domain, Nic, write_node_xml

    from kvmeter.pipeline.sim.simevents import EventBus

    work = Path(tempfile.mkdtemp(prefix="kvmeter-bench-fresh-"))
    nic = Nic(mac=VethHost.mac(0), bridge=VethHost.bridge(0), dev=VethHost.tap(0))
    uri = write_node_xml(work / "node.xml", [Domain(VM_NAME, VM_UUID, (nic,))])
    bus = EventBus()
    start = int(time.time() * 1000) - 60_000
    events = [bus.vm(event, VM_UUID, ACCOUNT, start)[1] for event in ("VM.CREATE", "VM.START")]
    return work, uri, events


def _start(host: VethHost, work: Path, name: str, *args: str) -> subprocess.Popen[bytes]:
    log = open(work / f"{name}.log", "wb")
    proc = subprocess.Popen(
        host.exec_args(str(KVMETER), *args), cwd=work, stdout=log, stderr=subprocess.STDOUT
    )
    log.close()
    return proc


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def _allinone(host: VethHost, interval: float) -> Iterator[tuple[list[subprocess.Popen[bytes]], Api, Path]]:
    """`kvmeter run --all-in-one`: agent, collector (SQLite) and API in one process."""
    work, uri, events = _work(interval)
    (work / "events.jsonl").write_bytes(b"".join(e + b"\n" for e in events))
    port = _free_port()
    config = _config(work, uri, interval, port)
    procs = [_start(host, work, "kvmeter", "run", "--all-in-one", "--config", str(config))]
    api = Api(host.host_ns, port)
    try:
        yield procs, api, work
    finally:
        api.close()
        _stop(procs)
        shutil.rmtree(work, ignore_errors=True)


@contextmanager
def _distributed(
    host: VethHost, interval: float
) -> Iterator[tuple[list[subprocess.Popen[bytes]], Api, Path]]:
    """`kvmeter agent` -> Tansu -> `kvmeter collector` (SQLite, API), all in the host namespace."""
    from bench.agent_bench import run_snippet, start_broker

    work, uri, events = _work(interval)
    broker = start_broker(host, work)  # creates the measures topic
    (work / "events.jsonl").write_bytes(b"".join(e + b"\n" for e in events))  # JSON: one line each
    produce = (
        "import sys\n"
        "from confluent_kafka import Producer\n"
        "from tests.harness.kafka import create_topic\n"
        f"create_topic('{broker.bootstrap}', 'cloudstack')\n"
        f"p = Producer({{'bootstrap.servers': '{broker.bootstrap}'}})\n"
        f"for line in open('{work / 'events.jsonl'}', 'rb').read().splitlines():\n"
        "    p.produce('cloudstack', line)\n"
        "sys.exit(p.flush(15))\n"
    )
    failed = run_snippet(host, produce)
    if failed:
        broker.stop()
        raise RuntimeError(f"lifecycle events not produced: {failed}")
    port = _free_port()
    (work / "agent.toml").write_text(
        _agent_toml(work, uri, interval)
        + f"""[kafka]
bootstrap_servers = "{broker.bootstrap}"
topic = "kvmeter.measures"
"""
    )
    (work / "collector.toml").write_text(
        f"""[store]
url = "sqlite:///{work / "usage.db"}"
[kafka]
bootstrap = "{broker.bootstrap}"
measures_topic = "kvmeter.measures"
lifecycle_topic = "cloudstack"
group = "bench-fresh"
options = {{ "session.timeout.ms" = 6000, "heartbeat.interval.ms" = 500 }}
[usage]
billable_traffic_types = ["public", "guest"]
[api]
listen = "127.0.0.1:{port}"
"""
    )
    procs = [_start(host, work, "collector", "collector", "--config", str(work / "collector.toml"))]
    procs.append(_start(host, work, "agent", "agent", "--config", str(work / "agent.toml")))
    api = Api(host.host_ns, port)
    try:
        yield procs, api, work
    finally:
        api.close()
        _stop(procs)
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)


MODES = {
    "all-in-one": ("kvmeter run --all-in-one (SQLite, API)", _allinone),
    "distributed": ("kvmeter agent -> Tansu -> kvmeter collector (SQLite, API)", _distributed),
}


def _logs(work: Path) -> str:
    return " | ".join(f"{p.name}: {p.read_text(errors='replace')[-800:]}" for p in sorted(work.glob("*.log")))


def _wait_ready(procs: list[subprocess.Popen[bytes]], api: Api, work: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"a kvmeter process exited: {_logs(work)}")
        try:
            api.sent_bytes()
            return
        except (OSError, http.client.HTTPException, RuntimeError) as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"API not up in {timeout} s ({exc}): {_logs(work)}") from None
            time.sleep(0.1)


def measure(
    host: VethHost, mode: str, interval: float, samples: int, log: Callable[[str], None]
) -> dict[str, Any]:
    with in_netns(host.vm_ns):
        vm_sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    frame = bytes.fromhex(BRIDGE_MAC.replace(":", "")) + b"\x02\x00\x00\x00\x00\x01" + ETHERTYPE
    frame += bytes(FRAME_BYTES - len(frame))
    rng = random.Random(5)
    delays: list[float] = []
    with MODES[mode][1](host, interval) as (procs, api, work):
        _wait_ready(procs, api, work, 60)
        # Until the VM's first bytes are billed, its owner and baseline are not settled: warm up.
        # The API can answer before the agent's first poll, which baselines (never bills) what
        # the tap moved until then: a warm-up frame is sent again until one shows, each time
        # after the last one would have shown (a poll and the pipeline's delay), so none is
        # still on its way when the samples start.
        base = api.sent_bytes()
        deadline = time.monotonic() + 5 * interval + 30
        next_send = time.monotonic()
        while api.sent_bytes() < base + FRAME_BYTES:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"the warm-up frame never showed: {_logs(work)}")
            if time.monotonic() >= next_send:
                vm_sock.sendto(frame, (VethHost.peer(0), 0))
                next_send += 2 * interval + 2
            time.sleep(0.1)
        # Right after a frame shows, the poll that carried it has just run; waiting (k + 1/2) / samples
        # of the interval puts the next send at that phase of the cycle: stratified phases give a
        # fair median with a handful of samples.
        phases = [(k + 0.5) / samples * interval for k in range(samples)]
        rng.shuffle(phases)
        for phase in phases:
            time.sleep(phase)
            base = api.sent_bytes()
            vm_sock.sendto(frame, (VethHost.peer(0), 0))
            sent = time.monotonic()
            deadline = sent + 3 * interval + 30
            while api.sent_bytes() < base + FRAME_BYTES:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"a frame did not show in {3 * interval + 30:.0f} s")
                time.sleep(PROBE_S)
            delays.append(time.monotonic() - sent)
    vm_sock.close()
    median = statistics.median(delays)
    log(f"freshness: {mode}, poll every {interval:g} s: {samples} samples, median {median:.2f} s")
    return {
        "mode": mode,
        "pipeline": MODES[mode][0],
        "poll_interval_s": interval,
        "samples": len(delays),
        "p50_s": percentile(delays, 50),
        "p99_s": percentile(delays, 99),
        "max_s": max(delays),
        "p50_over_interval": percentile(delays, 50) / interval,
        "delays_s": delays,
    }


def run(
    *, quick: bool, log: Callable[[str], None], plan: list[tuple[str, float, int]] | None = None
) -> dict[str, Any]:
    """`plan`: (mode, poll interval s, samples) per run."""
    plan = plan or (
        [("all-in-one", 1.0, 3)]
        if quick
        else [(mode, interval, n) for mode in MODES for interval, n in ((1.0, 20), (10.0, 5))]
    )
    with VethHost() as host:
        host.grow(1)
        runs = [measure(host, mode, interval, samples, log) for mode, interval, samples in plan]
    return {"probe_s": PROBE_S, "runs": runs}
