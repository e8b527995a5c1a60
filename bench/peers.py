"""Real peers side by side: the programs operators run to watch interface counters, from Debian's
packages, on the same interfaces in the same run as kvmeter's own poll.

* `prometheus-node-exporter` with only its netdev collector: one collection = one scrape.
* `collectd` with only its interface plugin, Interval 1: one collection a second (no write
  plugin: the cost of reading and dispatching, nothing written).
* `prometheus-libvirt-exporter` against a real libvirtd: its per-domain path (libvirt's domain
  stats, interface counters among them) over domains that are started paused (their taps exist,
  their guests run no code), so CPU is the exporter's and libvirtd's, not the guests'.

For each size the namespace of bench.vethns carries N taps; bench.agent_worker measures kvmeter's
daemon poll and the floor (one raw read of /proc/net/dev) there; each peer runs in the same
namespace and its CPU time is read from outside (psutil, user + system) around a known number
of collections, its resident memory at the end. The libvirt exporter's domains live in a
simulated host of their own (a real libvirtd there), with the floor read in that namespace.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench.vethns import VethHost

REPO = Path(__file__).resolve().parent.parent
NODE_EXPORTER = "prometheus-node-exporter"
COLLECTD = "collectd"
LIBVIRT_EXPORTER = "prometheus-libvirt-exporter"
PACKAGES = {NODE_EXPORTER: "prometheus-node-exporter", COLLECTD: "collectd-core",
            LIBVIRT_EXPORTER: "prometheus-libvirt-exporter"}  # fmt: skip
NICS_PER_DOMAIN = 25  # virtio NICs on PCI bus 0 of one `pc` machine, with room to spare
LIBVIRT_REPORTS = "per domain and NIC: cumulative counters (domain name/uuid), no tenant"
REPORTS = {
    "kvmeter": "per VM NIC and direction, attributed (VM, account, traffic type), deltas, spooled",
    NODE_EXPORTER: "per interface: cumulative counters, no VM",
    COLLECTD: "per interface: cumulative counters (rates in the writer), no VM",
    LIBVIRT_EXPORTER: LIBVIRT_REPORTS,
}

# Scrape `url` k times from inside the namespace; print the size of the last answer and how many
# of its series are receive-byte counters (one per interface the exporter reports).
_SCRAPE = """
import json, sys, urllib.request
url, k, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3]
for _ in range(k):
    body = urllib.request.urlopen(url, timeout=120).read().decode()
lines = [line for line in body.splitlines() if line.startswith(marker + "{")]
print(json.dumps({"bytes": len(body), "series": len(lines)}))
"""
# The floor as bench.agent_worker measures it (bench.agent_path.raw_read), k times; print the CPU
# seconds of one.
_FLOOR = """
import sys, time
from bench.agent_path import raw_read
k = int(sys.argv[1])
t = time.process_time()
for _ in range(k):
    raw_read()
print((time.process_time() - t) / k)
"""


def check_installed() -> None:
    missing = [pkg for binary, pkg in PACKAGES.items() if shutil.which(binary) is None]
    if missing:
        raise RuntimeError(f"not installed: {' '.join(missing)} (make bench-deps)")


def _cpu(proc: psutil.Process) -> float:
    """CPU seconds of the process's live threads, to the nanosecond (the scheduler's own count;
    psutil's user + system time moves in clock ticks of 10 ms, too coarse for one collection)."""
    total = 0
    for task in Path(f"/proc/{proc.pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError):
            continue  # a thread that just ended
    return total / 1e9


def _in_ns(ns_args: list[str], code: str, *args: str, timeout: float = 600) -> str:
    result = subprocess.run(
        [*ns_args, sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"in namespace: {result.stderr[-2000:]}")
    return result.stdout.strip()


def _wait_http(ns_args: list[str], url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the exporter exited ({proc.returncode})")
        try:
            _in_ns(ns_args, _SCRAPE, url, "1", "-", timeout=60)
            return
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def scrape_exporter(
    ns_args: list[str],
    command: list[str],
    port: int,
    scrapes: int,
    marker: str,
    side: psutil.Process | None = None,
) -> dict[str, Any]:
    """Start an exporter in the namespace, warm it up, then its CPU over ``scrapes`` scrapes (and
    that of ``side``, e.g. the libvirtd it asks) and its resident memory."""
    url = f"http://127.0.0.1:{port}/metrics"
    proc = subprocess.Popen([*ns_args, *command], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_http(ns_args, url, proc)
        _in_ns(ns_args, _SCRAPE, url, "2", marker)  # warm-up
        me = psutil.Process(proc.pid)  # `ip netns exec` execs: the same pid
        before, side_before = _cpu(me), _cpu(side) if side else 0.0
        answer = json.loads(_in_ns(ns_args, _SCRAPE, url, str(scrapes), marker))
        cpu, side_cpu = _cpu(me) - before, (_cpu(side) - side_before) if side else 0.0
        out = {
            "cpu_s_per_collection": cpu / scrapes,
            "rss_mb": me.memory_info().rss / 2**20,
            "collections": scrapes,
            "answer_bytes": answer["bytes"],
            "interfaces_reported": answer["series"],
        }
        if side is not None:
            out["libvirtd_cpu_s_per_collection"] = side_cpu / scrapes
        return out
    finally:
        _stop(proc)


def node_exporter(host: VethHost, scrapes: int) -> dict[str, Any]:
    command = [NODE_EXPORTER, "--collector.disable-defaults", "--collector.netdev",
               "--web.disable-exporter-metrics", "--web.listen-address=127.0.0.1:19100"]  # fmt: skip
    return scrape_exporter(host.exec_args(), command, 19100, scrapes, "node_network_receive_bytes_total")


def collectd(host: VethHost, seconds: float, workdir: Path) -> dict[str, Any]:
    """collectd's interface plugin reading every interface once a second, for ``seconds``."""
    conf = workdir / "collectd.conf"
    conf.write_text(
        f'Hostname "bench"\nFQDNLookup false\nInterval 1\nBaseDir "{workdir}"\n'
        f'PIDFile "{workdir}/collectd.pid"\nLoadPlugin interface\n'
    )
    proc = subprocess.Popen(
        host.exec_args(COLLECTD, "-f", "-C", str(conf)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        time.sleep(2.5)  # started, first reads done
        if proc.poll() is not None:
            raise RuntimeError(f"collectd exited ({proc.returncode}); config {conf}")
        me = psutil.Process(proc.pid)
        before, t0 = _cpu(me), time.monotonic()
        time.sleep(seconds)
        cpu, elapsed = _cpu(me) - before, time.monotonic() - t0
        return {
            "cpu_s_per_collection": cpu / elapsed,  # Interval 1: one collection a second
            "rss_mb": me.memory_info().rss / 2**20,
            "collections": round(elapsed),
        }
    finally:
        _stop(proc)


def kvmeter_and_floor(host: VethHost, n: int, rounds: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """kvmeter's daemon poll and the floor, from bench.agent_worker in the same namespace."""
    cmd = host.exec_args(
        sys.executable, "-m", "bench.agent_worker", "--n", str(n), "--vm-ns", host.vm_ns,
        "--rounds", str(rounds), "--slow-every", "1000",
    )  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"agent worker: {result.stderr[-2000:]}")
    methods = json.loads(result.stdout)["methods"]
    return {"cpu_s_per_collection": methods["kvmeter"]["cpu_s"]}, {"cpu_s": methods["floor"]["cpu_s"]}


def _floor_row(name: str, n: int, floor_s: float) -> dict[str, Any]:
    per_interface = floor_s / n * 1e6
    return {"peer": name, "n": n, "cpu_s_per_collection": floor_s, "total_cpu_s_per_collection": floor_s,
            "us_per_interface": per_interface, "ratio_to_floor": 1.0}  # fmt: skip


def _row(n: int, floor_s: float, figures: dict[str, Any], reports: str) -> dict[str, Any]:
    cpu = figures["cpu_s_per_collection"] + figures.get("libvirtd_cpu_s_per_collection", 0.0)
    return {
        **figures,
        "total_cpu_s_per_collection": cpu,  # with the libvirtd a libvirt exporter asks
        "n": n,
        "us_per_interface": cpu / n * 1e6,
        "ratio_to_floor": cpu / floor_s,
        "reports": reports,
    }


def run_interfaces(sizes: list[int], *, quick: bool, log: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    rounds, scrapes, seconds = (3, 5, 3.0) if quick else (7, 20, 10.0)
    with VethHost() as host, tempfile.TemporaryDirectory(prefix="kvmeter-peers-") as tmp:
        for n in sizes:
            host.grow(n)
            kvmeter, floor = kvmeter_and_floor(host, n, rounds)
            floor_s = floor["cpu_s"]
            rows.append(_floor_row("floor", n, floor_s))
            rows.append({"peer": "kvmeter", **_row(n, floor_s, kvmeter, REPORTS["kvmeter"])})
            for name, measure in (
                (NODE_EXPORTER, lambda: node_exporter(host, scrapes)),
                (COLLECTD, lambda: collectd(host, seconds, Path(tmp))),
            ):
                try:
                    rows.append({"peer": name, **_row(n, floor_s, measure(), REPORTS[name])})
                except Exception as exc:
                    rows.append({"peer": name, "n": n, "error": f"{type(exc).__name__}: {exc}"[:1000]})
            log(f"peers: {n} interfaces measured")
    return rows


def run_libvirt(n: int, *, quick: bool, log: Any) -> list[dict[str, Any]]:
    """The libvirt exporter over ``n`` interfaces of paused real domains (and the floor there)."""
    from kvmeter.pipeline.sim.simnet import Lab
    from kvmeter.pipeline.sim.vmguest import build_guest, download_kernel
    from kvmeter.pipeline.sim.vmhost import Guest, GuestNic, Libvirtd

    build = REPO / "build" / "realvm"
    image = build_guest(build, download_kernel(build / "debs"))
    lab = Lab()
    work = Path(tempfile.mkdtemp(prefix="kvmeter-peers-libvirt-"))
    libvirtd: Libvirtd | None = None
    try:
        host = lab.add_host("peers")
        libvirtd = Libvirtd(host.ns, work / "libvirt", cache_dir=build / "libvirt-cache").start()
        domains = (n + NICS_PER_DOMAIN - 1) // NICS_PER_DOMAIN
        for d in range(domains):
            count = min(NICS_PER_DOMAIN, n - d * NICS_PER_DOMAIN)
            nics = tuple(
                GuestNic(
                    "brvx-5001", f"02:00:7e:{d:02x}:{k // 256:02x}:{k % 256:02x}", f"10.9.{d}.{k + 1}/16"
                )
                for k in range(count)
            )
            guest = Guest(
                f"i-2-{9000 + d}-VM", f"7e000000-0000-4000-8000-{9000 + d:012d}", nics, memory_mb=64
            )
            xml = work / f"{guest.name}.xml"
            xml.write_text(guest.xml(image.kernel, image.initrd, work / f"{guest.name}.serial.log"))
            libvirtd.virsh("define", str(xml))
            libvirtd.virsh("start", "--paused", guest.name)
        log(f"peers: {domains} paused domains with {n} NICs under a real libvirtd")
        floor_s = float(_in_ns(host.exec_args(), _FLOOR, "200"))
        pid = libvirtd.libvirtd_pid
        side = psutil.Process(pid) if pid else None
        command = [
            LIBVIRT_EXPORTER,
            f"--libvirt.uri={libvirtd.readonly_uri}",
            "--web.listen-address=127.0.0.1:19177",
        ]
        marker = "libvirt_domain_interface_stats_receive_bytes_total"
        figures = scrape_exporter(host.exec_args(), command, 19177, 5 if quick else 20, marker, side=side)
        return [
            _floor_row("floor (libvirt host)", n, floor_s),
            {
                "peer": LIBVIRT_EXPORTER,
                "domains": domains,
                **_row(n, floor_s, figures, REPORTS[LIBVIRT_EXPORTER]),
            },
        ]
    finally:
        if libvirtd is not None:
            libvirtd.stop()
        lab.close()
        shutil.rmtree(work, ignore_errors=True)


def run(sizes: list[int], *, quick: bool, log: Any = print) -> dict[str, Any]:
    check_installed()
    rows = run_interfaces(sizes, quick=quick, log=log)
    libvirt_n = min(sizes[0], 200)
    try:
        rows += run_libvirt(libvirt_n, quick=quick, log=log)
    except Exception as exc:
        rows.append(
            {"peer": LIBVIRT_EXPORTER, "n": libvirt_n, "error": f"{type(exc).__name__}: {exc}"[:1000]}
        )
    return {"rows": rows}
