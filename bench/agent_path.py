"""The agent poll paths compared by the benchmark, each a zero-argument callable doing one poll of
every interface in the current network namespace.

- floor: one raw read of the kernel's counter table (/proc/net/dev): nothing can poll for less.
- kvmeter: the agent daemon's Agent.poll (kvmeter.agent.daemon) with its real topology
  (netlink) and spool (fsync), built by build_agent below: what `kvmeter agent` does every poll.
- kvmeter core: its pure stages of a steady poll alone (counters -> delta -> measures ->
  serialize), each timed.
- psutil: psutil.net_io_counters(pernic=True).
- pyroute2: a full RTM_GETLINK dump with each link's IFLA_STATS64.
- per-NIC scan: what libvirt's interfaceStats does for each NIC (virNetDevTapInterfaceStats:
  open /proc/net/dev and scan it line by line up to that NIC), timed on a sample of NICs and
  scaled to all N. libvirt's RPC round trip per call comes on top and is not counted.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from typing import Any

PROC_NET_DEV = "/proc/net/dev"


def raw_read() -> bytes:
    with open(PROC_NET_DEV, "rb", buffering=0) as f:
        return f.readall()


def per_nic_scan(name: str) -> tuple[int, int, int, int]:
    """One NIC's counters the way libvirt reads them: scan the table until its line."""
    prefix = name + ":"
    with open(PROC_NET_DEV, encoding="ascii") as f:
        for line in f:
            stripped = line.lstrip()
            if stripped.startswith(prefix):
                fields = stripped[len(prefix) :].split()
                return int(fields[0]), int(fields[1]), int(fields[8]), int(fields[9])
    raise LookupError(f"{name} not in {PROC_NET_DEV}")


def per_nic_sampler(names: list[str], sample: int, seed: int = 11) -> Callable[[], int]:
    """A callable that scans for `sample` random NICs (a fresh draw per call)."""
    rng = random.Random(seed)

    def run() -> int:
        for name in rng.sample(names, min(sample, len(names))):
            per_nic_scan(name)
        return sample

    return run


def psutil_poll() -> Callable[[], Any]:
    import psutil

    return lambda: psutil.net_io_counters(pernic=True)


def pyroute2_poll() -> tuple[Callable[[], Any], Callable[[], None]]:
    """(poll, close): one IPRoute socket kept open across polls, as a daemon would."""
    from pyroute2 import IPRoute

    ipr = IPRoute()

    def poll() -> list[Any]:
        return [link.get_attr("IFLA_STATS64") for link in ipr.get_links()]

    return poll, ipr.close


class KvmeterPoll:
    """kvmeter's steady agent poll over the bench host's taps tap0..tap{n-1} (each a NIC of a
    CloudStack user VM, two NICs per VM, on guest bridges brvx-<vni>), its pure stages called
    one by one: what Agent.poll runs when no link changed. Inventory and topology are what the
    daemon learns at start and on events; they are built here once, outside the poll. Each poll
    records the CPU seconds of its stages in `stage_cpu` (spooling is not a stage here)."""

    STAGES = ("counters", "delta", "measures", "serialize")

    def __init__(self, n: int, ifindexes: dict[str, int]) -> None:
        from bench.vethns import VethHost
        from kvmeter.agent.counters import read_boot_id
        from kvmeter.agent.delta import DeltaEngine
        from kvmeter.agent.measures import Attribution, Templates
        from kvmeter.agent.model import CounterKey, LinkPlacement
        from kvmeter.agent.wire import SteadyEncoder

        self.boot_id = read_boot_id()
        self.engine = DeltaEngine(self.boot_id)
        self.stream_id = uuid.uuid4().hex
        self.seq = 0
        self.metered: dict[str, Any] = {}
        pairs = []
        templates = Templates()
        for domain in bench_domains(n).values():
            for nic in domain.nics:
                i = VethHost.tap_index(nic.device or "")
                placement = LinkPlacement(bridge=VethHost.bridge(i), traffic_type="guest")
                key = CounterKey(self.boot_id, ifindexes[VethHost.tap(i)], VethHost.tap(i))
                self.metered[key.name] = key
                pairs.append(
                    (key, templates.pair(key, Attribution(domain=domain, nic=nic, placement=placement)))
                )
        self.pairs = dict(pairs)
        self.rows: tuple[list[int], tuple[Any, ...]] | None = None  # the table's metered rows, keys
        self.encoder: SteadyEncoder | None = None
        self.last_measures = 0
        self.last_bytes = 0
        self.stage_cpu: dict[str, list[float]] = {stage: [] for stage in self.STAGES}
        from kvmeter.agent.counters import KernelTable

        self.table = KernelTable()

    def poll(self) -> bytes:
        from kvmeter.agent.measures import batch_header
        from kvmeter.agent.wire import SteadyEncoder

        t0 = time.process_time()
        table = self.table.read()  # the daemon's: a netlink stats dump, rows keyed by ifindex
        if self.rows is None:  # the daemon keeps this per table layout
            metered = self.metered
            if table.ifindexes is None:
                found = [(i, metered[name]) for i, name in enumerate(table.names) if name in metered]
            else:
                by_index = {key.ifindex: key for key in self.metered.values()}
                found = [(i, by_index[x]) for i, x in enumerate(table.ifindexes) if x in by_index]
            self.rows = ([i for i, _ in found], tuple(key for _, key in found))
            self.encoder = SteadyEncoder([self.pairs[key] for _, key in found])
        rows, keys = self.rows
        columns = [
            list(map(column.__getitem__, rows))
            for column in (table.rx_bytes, table.rx_packets, table.tx_bytes, table.tx_packets)
        ]
        t1 = time.process_time()
        now_ms, mono_ms = time.time_ns() // 1_000_000, time.monotonic_ns() // 1_000_000
        steady = self.engine.poll_columns(now_ms, mono_ms, keys, *columns)
        if steady is None:  # the first poll baselines by rows
            self.engine.poll_readings(
                now_ms, mono_ms, list(zip(keys, zip(*columns, strict=True), strict=True))
            )
        t2 = time.process_time()
        parts: list[bytes] = []
        count = 0
        if steady is not None and self.encoder is not None:
            parts, count, _totals = self.encoder.encode(steady)
        t3 = time.process_time()
        self.seq += 1
        header = batch_header(
            host_id="bench-host", boot_id=self.boot_id, stream_id=self.stream_id, seq=self.seq, poll_ms=now_ms
        )
        data = header.SerializeToString() + b"".join(parts)
        t4 = time.process_time()
        for stage, spent in zip(self.STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            self.stage_cpu[stage].append(spent)
        self.last_measures = count
        self.last_bytes = len(data)
        return data


class StaticInventory:
    """The libvirt inventory's interface to the agent, answered from a fixed map: the real one is
    an event-driven cache, so on the poll path it is the same dictionary lookups."""

    def __init__(self, domains: dict[str, Any]) -> None:
        self._domains = domains
        self._by_device = {nic.device: (d, nic) for d in domains.values() for nic in d.nics if nic.device}

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def by_device(self) -> dict[str, Any]:
        return self._by_device

    def snapshot(self) -> dict[str, Any]:
        return self._domains

    def interface_stats(self, uuid: str, device: str, timeout: float = 2.0) -> None:
        return None


def bench_domains(n: int) -> dict[str, Any]:
    """uuid -> DomainInfo: n NICs on the bench host's taps, two per CloudStack user VM."""
    from bench.vethns import VethHost
    from kvmeter.agent.model import DomainInfo, NicInfo

    domains = {}
    for d in range(0, n, 2):
        nics = tuple(
            NicInfo(
                mac=VethHost.mac(i),
                device=VethHost.tap(i),
                nic_type="bridge",
                bridge=VethHost.bridge(i),
                model="virtio",
            )
            for i in range(d, min(d + 2, n))
        )
        vm = d // 2 + 1
        domain = DomainInfo(
            uuid=str(uuid.UUID(int=vm)),
            name=f"i-2-{vm}-VM",
            state="running",
            kind="user_vm",
            nics=nics,
            account_id="2",
            vm_id=str(vm),
        )
        domains[domain.uuid] = domain
    return domains


def build_agent(
    n: int,
    state_dir: str,
    *,
    bootstrap: str | None = None,
    topic: str = "kvmeter.measures",
    poll_interval: float = 10.0,
) -> Any:
    """kvmeter's Agent as `kvmeter agent` builds it (real topology over netlink, real spool with
    fsync, the real Kafka publisher when `bootstrap` is given), with the static inventory above."""
    from pathlib import Path

    from kvmeter.agent.config import validate
    from kvmeter.agent.counters import read_boot_id
    from kvmeter.agent.daemon import Agent
    from kvmeter.agent.metrics import AgentMetrics
    from kvmeter.agent.publish import Publisher
    from kvmeter.agent.spool import Spool
    from kvmeter.agent.topology import Topology

    settings: dict[str, Any] = {
        "agent": {"host_id": "bench-host", "poll_interval": poll_interval, "state_dir": state_dir},
        "metrics": {"enabled": False},
    }
    if bootstrap:
        settings["kafka"] = {"bootstrap_servers": bootstrap, "topic": topic}
    config = validate(settings)
    metrics = AgentMetrics()
    spool = Spool(Path(state_dir) / "spool", max_bytes=config.spool_max_bytes)
    publisher = None
    if bootstrap:
        publisher = Publisher(spool, bootstrap=bootstrap, topic=topic, key=config.host_id, metrics=metrics)
    return Agent(
        config,
        inventory=StaticInventory(bench_domains(n)),
        topology=Topology(config.traffic),
        spool=spool,
        boot_id=read_boot_id(),
        publisher=publisher,
        metrics=metrics,
    )
