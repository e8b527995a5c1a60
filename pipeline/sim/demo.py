"""`kvmeter demo`: a small simulated CloudStack cloud, metered by the all-in-one pipeline.

The cloud (kvmeter.pipeline.sim.democloud): one KVM host with CloudStack's bridges, alice's VM and
virtual router, bob's VM; as root, real network namespaces carry real traffic, so the bytes billed
can be checked against the VMs' own kernel counters. A short lifecycle plays in CloudStack's
event-bus format: create, start, IP assign, stop (the taps vanish with their last bytes),
upgrade, start again, IP release. The pipeline is `kvmeter run --all-in-one`, run on that host.
With --real-vms (as root, where QEMU runs) the VMs are real QEMU guests of a real libvirtd
(kvmeter.pipeline.sim.demoreal) and the bytes are checked against their taps.

Usage windows are one minute here (an hour by default), so a one-minute run shows a few.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import click

from kvmeter.collector.billing import months_costs
from kvmeter.collector.billing.tariff_file import load as load_tariff
from kvmeter.collector.model import NETWORK_BYTES_RECEIVED, NETWORK_BYTES_SENT, USAGE_TYPE_NAMES
from kvmeter.collector.store import Store
from kvmeter.collector.usage import rawusage
from kvmeter.pipeline import allinone
from kvmeter.pipeline.sim.democloud import ACCOUNTS, MEDIUM, POLL_SECONDS, SPECS, Cloud, Script
from kvmeter.pipeline.sim.demoreal import RealCloud

# A small tariff for a one-minute cloud: prices per hour and per MiB, with a tier boundary the
# demo's traffic crosses (the shipped example, packaging/config/tariff.toml.example, prices per GB).
DEMO_TARIFF = f"""# written by kvmeter demo
currency = "EUR"
decimals = 6

[[rate]]
usage_type = "RUNNING_VM"
per_hour = "0.0200"

[[rate]]
usage_type = "RUNNING_VM"
offering = "{MEDIUM}"
per_hour = "0.0400"

[[rate]]
usage_type = "ALLOCATED_VM"
per_hour = "0.0010"

[[rate]]
usage_type = "IP_ADDRESS"
per_hour = "0.0050"

[[rate]]
usage_type = "NETWORK_BYTES_SENT"
traffic_type = "public"
unit = "MiB"
tiers = [{{ up_to = 1, price = "0.10" }}, {{ price = "0.05" }}]

[[rate]]
usage_type = "NETWORK_BYTES_SENT"
traffic_type = "guest"
unit = "MiB"
price = "0.01"

[[rate]]
usage_type = "NETWORK_BYTES_RECEIVED"
traffic_type = "public"
unit = "MiB"
price = "0"

[[rate]]
usage_type = "NETWORK_BYTES_RECEIVED"
traffic_type = "guest"
unit = "MiB"
price = "0"
"""


def _config(workdir: Path, uri: str, api_listen: str, metrics_port: int, token: str) -> Path:
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
token = "{token}"
[lifecycle]
events_file = "events.jsonl"
[billing]
tariff_file = "tariff.toml"
"""
    )
    (workdir / "tariff.toml").write_text(DEMO_TARIFF)
    return path


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _summary(store: Store, cloud: Cloud | RealCloud, start_ms: int, tariff_file: Path) -> str:
    now = int(time.time() * 1000)
    rows = store.usage(start_ms - 3_600_000, now + 3_600_000)
    tariff = load_tariff(tariff_file, {"public", "guest"})
    months = {m.account: m for m in months_costs(store, tariff, None, now)}
    per: dict[tuple[str, int], int] = defaultdict(int)
    billed_bytes: dict[tuple[str, int], int] = defaultdict(int)
    for r in rows:
        per[(r.key.account, r.key.usage_type)] += r.quantity
        if r.key.usage_type in (NETWORK_BYTES_SENT, NETWORK_BYTES_RECEIVED):
            billed_bytes[(r.key.resource, r.key.usage_type)] += r.quantity
    lines = ["", f"Usage and costs per account (all windows of this run; tariff {tariff_file}):", ""]
    lines.append(f"  {'ACCOUNT':<8} {'USAGE TYPE':<24} {'QUANTITY':>16}  {'COST ' + tariff.currency:>14}")
    for (account, usage_type), qty in sorted(per.items()):
        unit = "bytes" if usage_type in (NETWORK_BYTES_SENT, NETWORK_BYTES_RECEIVED) else "hours"
        name = ACCOUNTS.get(account, account or "(unattributed)")
        label = f"{usage_type} {USAGE_TYPE_NAMES.get(usage_type, '')}"
        month = months.get(account)
        cost = month.by_usage_type().get(usage_type, (None, None))[0] if month else None
        lines.append(f"  {name:<8} {label:<24} {rawusage(usage_type, qty):>10} {unit:<5}  {cost!s:>14}")
    for account, month in sorted(months.items()):
        name = ACCOUNTS.get(account, account or "(unattributed)")
        note = "" if month.complete else f" ({len(month.unpriced)} item(s) unpriced)"
        lines.append(
            f"  {name:<8} {'TOTAL this month':<24} {'':>16}  {month.cost!s:>14}"
            f"  projected to the month's end: {month.projected} {tariff.currency}{note}"
        )
    truth = cloud.kernel_totals()
    if truth:
        lines += [
            "",
            f"Billed bytes against {cloud.truth_label} (all traffic types billable here):",
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

    def __init__(self, cloud: Cloud | RealCloud, workdir: Path):
        self.workdir = workdir
        # The API listens on the host's management address, reachable from here.
        self.api_host = cloud.host.mgmt_ip if cloud.host is not None else "127.0.0.1"
        self.api_port = _free_port()
        # not on loopback, so the API wants a credential: a token of this run's own
        self.token = secrets.token_hex(16)
        config = _config(workdir, cloud.uri, f"{self.api_host}:{self.api_port}", _free_port(), self.token)
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

    # Beside QEMU guests under software emulation on two cores, the start took over 30 s once
    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise click.ClickException(f"the pipeline exited early:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.url}/health", timeout=1):
                return
            time.sleep(0.2)
        raise click.ClickException(f"the pipeline's API did not come up:\n{self.log.read_text()[-3000:]}")

    def costs_line(self) -> str:
        """Each account's cost this month as the running pipeline's /v1/costs answers it."""
        req = urllib.request.Request(
            f"{self.url}/v1/costs", headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = json.loads(resp.read())
        costs = ", ".join(
            f"{ACCOUNTS.get(m['account'], m['account'] or '(unattributed)')} {m['cost']}"
            for m in body["accounts"]
        )
        return f"  /v1/costs of the running pipeline ({body['currency']}): {costs}"

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
@click.option(
    "--real-vms",
    is_flag=True,
    help="Real QEMU guests under a real libvirtd (as root; Debian's QEMU, libvirt, busybox-static).",
)
@click.option(
    "--vm-cache",
    type=click.Path(file_okay=False),
    default="build/realvm",
    show_default=True,
    help="With --real-vms: where the guest kernel .deb and the built guest are kept.",
)
def demo(seconds: float, workdir: str, linger: float | None, *, real_vms: bool, vm_cache: str) -> None:
    """Build a small simulated CloudStack cloud, meter it for a minute, show the usage."""
    work = Path(workdir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    real = os.geteuid() == 0
    click.echo(f"kvmeter demo in {work}")
    cloud: Cloud | RealCloud
    if real_vms:
        if not real:
            raise click.ClickException("--real-vms needs root (network namespaces, libvirtd, QEMU)")
        click.echo("  host: network namespaces, a real libvirtd and QEMU guests (software emulation)")
        try:
            cloud = RealCloud(work, Path(vm_cache).resolve())
        except RuntimeError as exc:
            raise click.ClickException(f"real guests cannot run here: {exc}") from exc
    else:
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
        cloud.finish()
        click.echo("  traffic stopped; letting the pipeline poll and apply the last bytes")
        time.sleep(3 * POLL_SECONDS)
        click.echo(_summary(pipeline.store, cloud, start_ms, work / "tariff.toml"))
        click.echo(pipeline.costs_line())
        today = dt.datetime.now(dt.UTC).date()
        days = f"{today}", f"{today + dt.timedelta(days=1)}"
        click.echo(f"\nAPI (running): {pipeline.url}/v1/usage?start={days[0]}&end={days[1]}&format=csv")
        click.echo(f"  with header: Authorization: Bearer {pipeline.token}")
        listing = f"command=listUsageRecords&startdate={days[0]}&enddate={days[0]}"
        click.echo(f"  CloudStack:  {pipeline.url}/client/api?{listing}")
        db = f"sqlite:///{work / 'usage.db'}"
        click.echo(f"CLI:           kvmeter usage --db {db} --start {days[0]} --end {days[1]}")
        click.echo(f"Costs:         {pipeline.url}/v1/costs (format=csv; account=...; items=true)")
        click.echo(f"               kvmeter costs --db {db} --tariff {work / 'tariff.toml'}")
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
