"""`kvmeter demo`: a small simulated CloudStack cloud, metered by the all-in-one pipeline.

The cloud: one KVM host with CloudStack's bridges, alice's isolated network (a user VM and its
virtual router with guest, control and public NICs) and bob's VM on a shared public network.
libvirt's test driver describes the domains; as root, real network namespaces stand behind them
and carry real traffic, so the bytes billed can be checked against the VMs' own kernel counters.
A short lifecycle plays on CloudStack's event bus format: create, start, IP assign, stop (the
taps vanish with their last bytes), upgrade, start again, IP release.

Usage windows are one minute here (an hour by default), so a one-minute run shows a few.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import click

from kvmeter.collector.model import NETWORK_BYTES_RECEIVED, NETWORK_BYTES_SENT, USAGE_TYPE_NAMES
from kvmeter.collector.store import Store
from kvmeter.collector.usage import rawusage
from kvmeter.pipeline import allinone
from kvmeter.pipeline.simevents import EventBus
from kvmeter.pipeline.simlibvirt import Domain, Nic, write_node_xml
from kvmeter.pipeline.simnet import Host, Lab, Vm

ACCOUNTS = {
    "5a1ce000-0000-4000-8000-00000000a11c": "alice",
    "b0b00000-0000-4000-8000-000000000b0b": "bob",
}
ALICE, BOB = list(ACCOUNTS)
SMALL, MEDIUM = "c0ffee00-0000-4000-8000-000000000001", "c0ffee00-0000-4000-8000-000000000002"


@dataclass(frozen=True)
class VmSpec:
    name: str
    uuid: str
    account: str
    nics: tuple[tuple[str, str, str], ...]  # (bridge, guest MAC, address/prefix)
    owner: tuple[tuple[str, str], ...] = ()  # CloudStack <metadata> of a router


ALICE_VM = VmSpec(
    "i-2-10-VM",
    "6f1c6c4e-0000-4000-8000-000000000010",
    ALICE,
    (("brvx-5001", "02:00:0a:00:00:01", "10.1.1.10/24"),),
)
ROUTER = VmSpec(
    "r-5-VM",
    "6f1c6c4e-0000-4000-8000-000000000005",
    ALICE,
    (
        ("brvx-5001", "02:00:05:00:00:01", "10.1.1.1/24"),  # eth0 guest
        ("cloud0", "0e:00:a9:fe:00:05", "169.254.3.5/16"),  # eth1 control
        ("cloudbr0", "06:00:05:00:00:03", "198.51.100.5/24"),  # eth2 public (source NAT)
    ),
    owner=(("ownerAccountUuid", ALICE), ("ownerAccountName", "alice")),
)
BOB_VM = VmSpec(
    "i-3-11-VM",
    "6f1c6c4e-0000-4000-8000-000000000011",
    BOB,
    (("cloudbr0", "02:00:0b:00:00:01", "198.51.100.11/24"),),
)
SPECS = (ALICE_VM, ROUTER, BOB_VM)
PUBLIC_GATEWAY = "198.51.100.1"
POLL_SECONDS = 2.0


class Cloud:
    """The simulated host. Without root it is libvirt's test driver alone: no taps, no bytes."""

    def __init__(self, workdir: Path, *, real_network: bool):
        self.workdir = workdir
        self.lab: Lab | None = None
        self.host: Host | None = None
        self.vms: dict[str, Vm] = {}  # every VM booted so far, running or stopped
        self.quiet: set[str] = set()  # VMs shutting down: no more traffic from them
        if real_network:
            self.lab = Lab()
            self.host = self.lab.add_host("kvm1")
        self.uri = self.write_libvirt()

    def write_libvirt(self) -> str:
        domains = [
            Domain(s.name, s.uuid, tuple(Nic(mac=m, bridge=b) for b, m, _ in s.nics), owner=dict(s.owner))
            for s in SPECS
        ]
        return write_node_xml(self.workdir / "node.xml", domains)

    def boot(self, spec: VmSpec) -> None:
        if self.host is None:
            return
        vm = self.vms.get(spec.name)
        if vm is None:
            self.vms[spec.name] = self.host.add_vm(spec.name, spec.uuid, list(spec.nics))
        elif not vm.present:
            self.host.plug_all(vm)  # started again: the same taps come back
        self.quiet.discard(spec.name)

    def stop(self, spec: VmSpec) -> None:
        vm = self.vms.get(spec.name)
        if self.host is not None and vm is not None and vm.present:
            self.host.unplug_all(vm)  # the taps vanish with their last bytes

    def traffic(self) -> None:
        """One second's worth: guest traffic to the router, public traffic out and in."""
        sends = [
            (ALICE_VM.name, "10.1.1.1", 40_000, 0),
            (ROUTER.name, PUBLIC_GATEWAY, 120_000, 2),
            (BOB_VM.name, PUBLIC_GATEWAY, 60_000, 0),
        ]
        for name, dst, nbytes, nic in sends:
            vm = self.vms.get(name)
            if vm is not None and vm.present and name not in self.quiet:
                vm.send(dst, nbytes, nic=nic)

    def kernel_totals(self) -> dict[tuple[str, int], int]:
        """VM-side kernel counters over every incarnation: (vm uuid, usage type) -> bytes."""
        totals: dict[tuple[str, int], int] = defaultdict(int)
        for vm in self.vms.values():
            for nic in vm.nics:
                t = nic.total()
                totals[(vm.uuid, NETWORK_BYTES_SENT)] += t["tx_bytes"]
                totals[(vm.uuid, NETWORK_BYTES_RECEIVED)] += t["rx_bytes"]
        return totals

    def close(self) -> None:
        if self.lab is not None:
            self.lab.close()


def _config(workdir: Path, uri: str, api_listen: str, metrics_port: int) -> Path:
    path = workdir / "allinone.toml"
    path.write_text(
        f"""# written by kvmeter demo
[agent]
host_id = "kvm1"
poll_interval = {POLL_SECONDS}
state_dir = "{workdir / "agent"}"
log_level = "warning"
[libvirt]
uri = "{uri}"
[metrics]
port = {metrics_port}
[store]
url = "sqlite:///{workdir / "usage.db"}"
[usage]
window_seconds = 60
grace_seconds = 60
tick_seconds = 2
billable_traffic_types = ["public", "guest"]
[api]
listen = "{api_listen}"
[lifecycle]
events_file = "events.jsonl"
"""
    )
    return path


class Script:
    """The lifecycle, as CloudStack would publish it, appended to the events file on cue."""

    def __init__(self, cloud: Cloud, events: Path, seconds: float):
        self.cloud, self.events, self.seconds = cloud, events, seconds
        self.bus = EventBus(offset_minutes=60)  # a management server in UTC+1
        self.t0 = time.time()
        s = seconds
        # (at second, what, action)
        self.steps = [
            (0.0, "alice: VM.CREATE + VM.START i-2-10-VM; router r-5-VM up", self._start_alice),
            (0.0, "bob: VM.CREATE + VM.START i-3-11-VM, NET.IPASSIGN 198.51.100.11", self._start_bob),
            (s * 0.15, "alice: NET.IPASSIGN 198.51.100.20", self._alice_ip),
            # A guest goes quiet before it powers off. (A veth, unlike a real tap, loses its
            # receive counter in the delete message, so bob's sending stops a poll earlier.)
            (max(0.0, s * 0.35 - 5), "bob: shutting down", self._quiet_bob),
            (s * 0.35, "bob: VM.STOP (taps deleted with their last bytes)", self._stop_bob),
            (s * 0.45, "bob: VM.UPGRADE to the medium offering", self._upgrade_bob),
            (s * 0.5, "bob: VM.START (medium)", self._start_bob_again),
            (s * 0.75, "alice: NET.IPRELEASE 198.51.100.20", self._release_alice_ip),
        ]

    def _emit(self, *records: tuple[bytes, bytes]) -> None:
        with open(self.events, "ab") as f:
            for _key, value in records:
                f.write(value + b"\n")

    def _ms(self) -> int:
        return int(time.time() * 1000)

    def _start_alice(self) -> None:
        self.cloud.boot(ROUTER)
        self.cloud.boot(ALICE_VM)
        now = self._ms()
        self._emit(
            self.bus.vm("VM.CREATE", ALICE_VM.uuid, ALICE, now, SMALL),
            self.bus.vm("VM.START", ALICE_VM.uuid, ALICE, now, SMALL),
        )

    def _start_bob(self) -> None:
        self.cloud.boot(BOB_VM)
        now = self._ms()
        self._emit(
            self.bus.vm("VM.CREATE", BOB_VM.uuid, BOB, now, SMALL),
            self.bus.vm("VM.START", BOB_VM.uuid, BOB, now, SMALL),
            self.bus.ip("NET.IPASSIGN", "1b000000-0000-4000-8000-000000000011", BOB, now, "198.51.100.11"),
        )

    def _alice_ip(self) -> None:
        self._emit(
            self.bus.ip(
                "NET.IPASSIGN", "1a000000-0000-4000-8000-000000000020", ALICE, self._ms(), "198.51.100.20"
            )
        )

    def _release_alice_ip(self) -> None:
        self._emit(
            self.bus.ip(
                "NET.IPRELEASE", "1a000000-0000-4000-8000-000000000020", ALICE, self._ms(), "198.51.100.20"
            )
        )

    def _quiet_bob(self) -> None:
        self.cloud.quiet.add(BOB_VM.name)

    def _stop_bob(self) -> None:
        self.cloud.stop(BOB_VM)
        self._emit(self.bus.vm("VM.STOP", BOB_VM.uuid, BOB, self._ms(), SMALL))

    def _upgrade_bob(self) -> None:
        self._emit(self.bus.vm("VM.UPGRADE", BOB_VM.uuid, BOB, self._ms(), MEDIUM))

    def _start_bob_again(self) -> None:
        self.cloud.boot(BOB_VM)
        self._emit(self.bus.vm("VM.START", BOB_VM.uuid, BOB, self._ms(), MEDIUM))

    def due(self) -> list[str]:
        """Run the steps whose time has come; return what they were."""
        elapsed = time.time() - self.t0
        done = []
        while self.steps and self.steps[0][0] <= elapsed:
            _, what, action = self.steps.pop(0)
            action()
            done.append(what)
        return done


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _summary(store: Store, cloud: Cloud, start_ms: int) -> str:
    rows = store.usage(start_ms - 3_600_000, int(time.time() * 1000) + 3_600_000)
    per: dict[tuple[str, int], int] = defaultdict(int)
    billed_bytes: dict[tuple[str, int], int] = defaultdict(int)
    for r in rows:
        per[(r.key.account, r.key.usage_type)] += r.quantity
        if r.key.usage_type in (NETWORK_BYTES_SENT, NETWORK_BYTES_RECEIVED):
            billed_bytes[(r.key.resource, r.key.usage_type)] += r.quantity
    lines = ["", "Usage per account (all windows of this run):", ""]
    lines.append(f"  {'ACCOUNT':<8} {'USAGE TYPE':<24} {'QUANTITY':>16}")
    for (account, usage_type), qty in sorted(per.items()):
        unit = "bytes" if usage_type in (NETWORK_BYTES_SENT, NETWORK_BYTES_RECEIVED) else "hours"
        name = ACCOUNTS.get(account, account or "(unattributed)")
        label = f"{usage_type} {USAGE_TYPE_NAMES.get(usage_type, '')}"
        lines.append(f"  {name:<8} {label:<24} {rawusage(usage_type, qty):>10} {unit}")
    truth = cloud.kernel_totals()
    if truth:
        lines += [
            "",
            "Billed bytes against the VMs' own kernel counters (all traffic types billable here):",
            "",
        ]
        lines.append(f"  {'VM':<10} {'DIRECTION':<9} {'KERNEL':>12} {'BILLED':>12} {'DIFF':>6}")
        for spec in SPECS:
            for usage_type, label in ((NETWORK_BYTES_SENT, "sent"), (NETWORK_BYTES_RECEIVED, "received")):
                kernel = truth.get((spec.uuid, usage_type), 0)
                billed = billed_bytes.get((spec.uuid, usage_type), 0)
                lines.append(f"  {spec.name:<10} {label:<9} {kernel:>12} {billed:>12} {billed - kernel:>+6}")
    return "\n".join(lines)


class Pipeline:
    """`kvmeter run --all-in-one` as a process on the simulated host (in its namespace), as an
    operator would run it there; the demo watches it through its store."""

    def __init__(self, cloud: Cloud, workdir: Path):
        self.workdir = workdir
        # The API listens on the host's management address, reachable from here.
        self.api_host = cloud.host.mgmt_ip if cloud.host is not None else "127.0.0.1"
        self.api_port = _free_port()
        config = _config(workdir, cloud.uri, f"{self.api_host}:{self.api_port}", _free_port())
        allinone.load(config)  # fail here, clearly, if the demo wrote something wrong
        cmd = [sys.executable, "-m", "kvmeter", "run", "--all-in-one", "--config", str(config)]
        if cloud.host is not None:
            cmd = cloud.host.exec_args(*cmd)
        self.log = workdir / "allinone.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        self.store = Store(f"sqlite:///{workdir / 'usage.db'}")

    @property
    def url(self) -> str:
        return f"http://{self.api_host}:{self.api_port}"

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise click.ClickException(f"the pipeline exited early:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.url}/health", timeout=1):
                return
            time.sleep(0.2)
        raise click.ClickException(f"the pipeline's API did not come up:\n{self.log.read_text()[-3000:]}")

    def polls(self) -> int:
        with contextlib.suppress(Exception):
            return sum(self.store.marks().values())
        return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.store.close()


@click.command("demo")
@click.option("--seconds", type=float, default=60.0, show_default=True, help="How long the cloud runs.")
@click.option("--workdir", type=click.Path(file_okay=False), default="build/demo", show_default=True)
@click.option(
    "--linger",
    type=float,
    default=None,
    help="Keep the pipeline and its API up this long at the end (default: until Ctrl-C on a terminal).",
)
def demo(seconds: float, workdir: str, linger: float | None) -> None:
    """Build a small simulated CloudStack cloud, meter it for a minute, show the usage."""
    work = Path(workdir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    real = os.geteuid() == 0
    click.echo(f"kvmeter demo in {work}")
    click.echo(
        "  simulated host: libvirt test driver"
        + (" + network namespaces with real traffic" if real else " only (run as root for real traffic)")
    )
    cloud = Cloud(work, real_network=real)
    pipeline: Pipeline | None = None
    try:
        pipeline = Pipeline(cloud, work)
        pipeline.wait_ready()
        click.echo(f"  pipeline: kvmeter run --all-in-one (log {pipeline.log}), API {pipeline.url}")
        time.sleep(2.5)  # the agent's first poll is a baseline: taps created from now on count from zero
        start_ms = int(time.time() * 1000)
        script = Script(cloud, work / "events.jsonl", seconds)
        deadline = time.monotonic() + seconds
        next_line = time.monotonic() + 1
        while time.monotonic() < deadline:
            for what in script.due():
                click.echo(f"  [{time.time() - script.t0:>3.0f}s] {what}")
            cloud.traffic()
            if time.monotonic() >= next_line:
                _progress(pipeline, script, seconds)
                next_line += 5
            time.sleep(max(0.0, 1.0 - (time.monotonic() % 1.0)))
        for what in script.due():  # anything left
            click.echo(f"  [{time.time() - script.t0:>3.0f}s] {what}")
        click.echo("  traffic stopped; letting the pipeline poll and apply the last bytes")
        time.sleep(3 * POLL_SECONDS)
        click.echo(_summary(pipeline.store, cloud, start_ms))
        today = dt.datetime.now(dt.UTC).date()
        days = f"{today}", f"{today + dt.timedelta(days=1)}"
        click.echo(f"\nAPI (running): {pipeline.url}/v1/usage?start={days[0]}&end={days[1]}&format=csv")
        listing = f"command=listUsageRecords&startdate={days[0]}&enddate={days[0]}"
        click.echo(f"  CloudStack:  {pipeline.url}/client/api?{listing}")
        db = f"sqlite:///{work / 'usage.db'}"
        click.echo(f"CLI:           kvmeter usage --db {db} --start {days[0]} --end {days[1]}")
        _linger(linger)
    finally:
        if pipeline is not None:
            pipeline.stop()
        cloud.close()


def _progress(pipeline: Pipeline, script: Script, seconds: float) -> None:
    stats = pipeline.store.stats(0)
    sys.stdout.write(
        f"  [{time.time() - script.t0:>3.0f}s/{seconds:.0f}s] batches applied {pipeline.polls()}  "
        f"usage records {stats['usage_records']}  parked bytes {stats['parked_bytes']}  "
        f"dead letters {stats['dead_letters']}\n"
    )
    sys.stdout.flush()


def _linger(linger: float | None) -> None:
    if linger is None:
        linger = float("inf") if sys.stdin.isatty() else 0.0
    if linger <= 0:
        return
    click.echo(
        "(the pipeline and its API stay up; Ctrl-C to end)"
        if linger == float("inf")
        else f"(up for {linger:.0f} s)"
    )
    with contextlib.suppress(KeyboardInterrupt):
        end = time.monotonic() + linger
        while time.monotonic() < end:
            time.sleep(0.5)
