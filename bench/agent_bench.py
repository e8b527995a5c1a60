"""Agent poll cost, memory and CPU share for growing numbers of interfaces, in one namespace.

For each size: grow the namespace's veth taps, run bench.agent_worker there (every method side
by side, interleaved) and then a real agent poll loop (bench.agent_loop: the agent as
`kvmeter agent` builds it, with libvirt's test driver and a Tansu broker inside the same
namespace) while bench.frames moves bytes on every tap; the loop's resident memory is sampled
from outside with psutil.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from tests.harness.kafka import Broker

from bench.vethns import VethHost

REPO = Path(__file__).resolve().parent.parent
TOPIC = "kvmeter.measures"


def _python(host: VethHost, module: str, *args: str) -> list[str]:
    return host.exec_args(sys.executable, "-m", module, *args)


def _run_json(cmd: list[str], timeout: float) -> dict[str, Any]:
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[-6:])} failed ({result.returncode}): {result.stderr[-3000:]}")
    return json.loads(result.stdout)


def start_broker(host: VethHost, log_dir: Path) -> Broker:
    """A Tansu broker on the host namespace's loopback, with the measures topic created."""
    broker = Broker(host="127.0.0.1", port=9092, log_dir=log_dir)
    log = open(broker.log_path, "wb")
    broker.proc = subprocess.Popen(host.exec_args(*broker.command()), stdout=log, stderr=subprocess.STDOUT)
    log.close()
    create = (
        "import sys, time\n"
        "from tests.harness.kafka import create_topic\n"
        "deadline = time.monotonic() + 20\n"
        "while True:\n"
        "    try:\n"
        f"        create_topic('{broker.bootstrap}', '{TOPIC}')\n"
        "        break\n"
        "    except Exception as exc:\n"
        "        if time.monotonic() > deadline: sys.exit(f'broker not ready: {exc}')\n"
        "        time.sleep(0.3)\n"
    )
    failed = run_snippet(host, create)
    if failed:
        broker.stop()
        raise RuntimeError(f"Tansu in {host.host_ns}: {failed}")
    return broker


def run_snippet(host: VethHost, code: str) -> str | None:
    """Run Python code in the host namespace (from the repository, so tests.harness imports);
    None when it succeeded, else the end of its stderr."""
    result = subprocess.run(
        host.exec_args(sys.executable, "-c", code), capture_output=True, text=True, cwd=REPO, check=False
    )
    return None if result.returncode == 0 else result.stderr[-2000:] or f"exit {result.returncode}"


def write_libvirt(path: Path, n: int) -> str:
    """libvirt test-driver domains for the first n taps: CloudStack user VMs with two NICs each."""
    from tests.harness.libvirt_node import Domain, Nic, write_node_xml

    domains = []
    for d in range(0, n, 2):
        nics = tuple(
            Nic(mac=VethHost.mac(i), bridge=VethHost.bridge(i), dev=VethHost.tap(i))
            for i in range(d, min(d + 2, n))
        )
        vm = d // 2 + 1
        domains.append(Domain(f"i-2-{vm}-VM", f"6f1c6c4e-0000-4000-8000-{vm:012d}", nics))
    return write_node_xml(path, domains)


def run_loop(
    host: VethHost,
    n: int,
    bootstrap: str,
    uri: str,
    polls: int,
    interval: float,
    properties: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The agent poll loop with traffic; its result plus peak and final resident memory."""
    pusher = subprocess.Popen(
        _python(host, "bench.frames", "--n", str(n), "--vm-ns", host.vm_ns, "--every", str(interval / 2)),
        cwd=REPO,
    )
    loop = subprocess.Popen(
        _python(
            host,
            "bench.agent_loop",
            "--n",
            str(n),
            "--polls",
            str(polls),
            "--interval",
            str(interval),
            "--bootstrap",
            bootstrap,
            "--libvirt-uri",
            uri,
            "--topic",
            TOPIC,
            "--kafka-properties",
            json.dumps(properties or {}),
        ),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak = last = 0
    try:
        proc = psutil.Process(loop.pid)  # `ip netns exec` execs: same pid
        deadline = time.monotonic() + 120 + polls * interval * 3
        while loop.poll() is None:
            if time.monotonic() > deadline:
                loop.kill()
                raise RuntimeError(f"agent loop for {n} interfaces did not finish")
            try:
                last = proc.memory_info().rss
            except psutil.NoSuchProcess:
                break
            peak = max(peak, last)
            time.sleep(0.1)
        out, err = loop.communicate()
    finally:
        pusher.kill()
        pusher.wait()
    if loop.returncode != 0:
        raise RuntimeError(f"agent loop failed ({loop.returncode}): {err[-3000:]}")
    result: dict[str, Any] = json.loads(out)
    result["rss_peak_mb"] = peak / 2**20
    result["rss_last_mb"] = last / 2**20
    return result


def measure_loop(
    host: VethHost, n: int, bootstrap: str, uri: str, polls: int, interval: float, log: Any
) -> dict[str, Any]:
    """run_loop with the agent's default config (a poll over kafka.max_batch_bytes goes out as
    several batches), plus the memory libvirt's in-process test driver takes."""
    try:
        loop = run_loop(host, n, bootstrap, uri, polls, interval)
    except RuntimeError as exc:
        log(f"agent: the loop for {n} interfaces failed: {str(exc)[-300:]}")
        return {"error": str(exc)[-3000:]}
    driver = _run_json([sys.executable, "-m", "bench.libvirt_rss", "--uri", uri], timeout=300)
    loop["libvirt_test_driver_mb"] = driver["test_driver_mb"]
    loop["rss_peak_without_test_driver_mb"] = loop["rss_peak_mb"] - driver["test_driver_mb"]
    return loop


def derive(worker: dict[str, Any], loop: dict[str, Any], interval: float) -> dict[str, Any]:
    """The figures of one size: per-interface cost, ratio to the floor, CPU share, memory."""
    n = worker["n"]
    floor = worker["methods"]["floor"]["cpu_s"]
    methods = {}
    for name, m in worker["methods"].items():
        methods[name] = {
            **m,
            "us_per_interface": m["cpu_s"] / n * 1e6,
            "ratio_to_floor": m["cpu_s"] / floor,
            "cpu_share_at_interval": m["cpu_s"] / interval,
        }
    if "error" not in loop:
        # the mean, not the median: the occasional heavy poll (a full inventory) is CPU spent too
        loop["cpu_share_at_interval"] = (
            loop["poll_cpu_mean_s"] + loop["other_cpu_per_s"] * interval
        ) / interval
    return {
        "n": n,
        "table_lines": worker["table_lines"],
        "measures_per_poll": worker["measures_per_poll"],
        "batch_bytes": worker["batch_bytes"],
        "per_nic_sample": worker["per_nic_sample"],
        "methods": methods,
        "kvmeter_core_stages_us_per_interface": {
            stage: s / n * 1e6 for stage, s in worker["kvmeter_stages_cpu_s"].items()
        },
        "agent_loop": loop,
    }


def run(sizes: list[int], *, quick: bool, interval: float = 10.0, log: Any = print) -> dict[str, Any]:
    rounds = 3 if quick else 9
    loop_polls, loop_interval = (2, 0.5) if quick else (5, 2.0)
    out: dict[str, Any] = {"poll_interval_s": interval, "sizes": []}
    with VethHost() as host, tempfile.TemporaryDirectory(prefix="kvmeter-bench-") as tmp:
        broker = start_broker(host, Path(tmp))
        try:
            for n in sizes:
                t0 = time.monotonic()
                host.grow(n)
                log(f"agent: {n} interfaces ready in {time.monotonic() - t0:.1f} s")
                slow_every = 1 if n <= 2000 else 3
                size_rounds = rounds if n <= 2000 else max(3, rounds // 2)
                worker = _run_json(
                    _python(
                        host,
                        "bench.agent_worker",
                        "--n",
                        str(n),
                        "--vm-ns",
                        host.vm_ns,
                        "--rounds",
                        str(size_rounds),
                        "--slow-every",
                        str(slow_every),
                    ),
                    timeout=900,
                )
                uri = write_libvirt(Path(tmp) / f"node-{n}.xml", n)
                loop = measure_loop(host, n, broker.bootstrap, uri, loop_polls, loop_interval, log)
                out["sizes"].append(derive(worker, loop, interval))
                log(f"agent: {n} interfaces measured in {time.monotonic() - t0:.1f} s")
        finally:
            broker.stop()
    return out
