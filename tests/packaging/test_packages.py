"""The packages, built from this tree and installed the way an operator installs them.

The .debs go into a clean Debian 12 root (debootstrap, only Debian's packages) with apt, so the
code runs against Debian's own library versions (pyroute2 0.7.2, protobuf 3.21, SQLAlchemy
1.4.46, ...). Inside that root: the agent meters a VM of a simulated KVM host (network namespace
+ libvirt's test driver) with `kvmeter agent --once`, and its batch goes through `kvmeter ingest`
and `kvmeter usage` on SQLite. Then the root's systemd is booted (nspawn) with libvirtd and both
services as installed, and last come upgrade, remove and purge. The .rpms (EL9) are checked for
files, requirements and scriptlets, and both formats are linted.

Needs root (chroot, mounts, namespaces) and Debian's mirror; nothing here skips.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.netns import Lab

pytestmark = pytest.mark.packaging

TOP = Path(__file__).resolve().parents[2]
CI = TOP / "packaging" / "ci"
VERSION = tomllib.loads((TOP / "pyproject.toml").read_text())["project"]["version"]
DEBS = ("python3-kvmeter", "kvmeter-agent", "kvmeter-collector")
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}
# Debian 12's versions that the code must work with (COMMON.md); the root must really have them.
DEBIAN_LIBRARIES = {
    "python3-libvirt": "9.0.0",
    "python3-pyroute2": "0.7.2",
    "python3-psutil": "5.9.4",
    "python3-msgpack": "1.0.3",
    "python3-confluent-kafka": "1.7.0",
    "python3-protobuf": "3.21.12",
    "python3-sqlalchemy": "1.4.46",
    "python3-click": "8.1.3",
}
ACCOUNT = "7c6b2a40-0000-4000-8000-00000000ac01"
VM_UUID = "5b2d3c1e-0000-4000-8000-00000000000a"
VM_MAC = "02:00:00:00:0a:01"
ZONE = "8ad00000-0000-4000-8000-0000000000aa"


def _run(
    argv: list[str], *, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env={**CLEAN_ENV, **(env or {})}
    )


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, (
        f"{proc.args} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    return proc.stdout


class DebianRoot:
    """A chroot with the packages installed; commands run with a clean environment."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def argv(self, *cmd: str, user: str | None = None) -> list[str]:
        prefix = ["runuser", "-u", user, "--"] if user else []
        return ["chroot", str(self.path), *prefix, *cmd]

    def run(
        self, *cmd: str, user: str | None = None, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        return _run(self.argv(*cmd, user=user), timeout=timeout)

    def ok(self, *cmd: str, user: str | None = None) -> str:
        return _ok(self.run(*cmd, user=user))

    def apt(self, *args: str) -> str:
        """apt-get inside the root (through debian-root.sh: the download cache is shared)."""
        return _ok(_run([str(CI / "debian-root.sh"), "apt", str(self.path), *args]))

    def apt_install(self, *debs: Path) -> str:
        inside = []
        for deb in debs:
            shutil.copy(deb, self.path / "tmp")
            inside.append(f"/tmp/{deb.name}")
        return self.apt("install", "-y", "--no-install-recommends", *inside)

    def stat(self, path: str) -> str:
        return self.ok("stat", "-c", "%U:%G %a", path).strip()


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`make packages` into a private directory: the .debs and the .rpms of this tree."""
    out = tmp_path_factory.mktemp("dist")
    work = tmp_path_factory.mktemp("package-build")
    for script in ("build-deb.sh", "build-rpm.sh"):
        _ok(_run([str(CI / script)], env={"DIST_DIR": str(out), "PACKAGE_BUILD_DIR": str(work)}))
    return out


def _deb(dist: Path, name: str, version: str = VERSION) -> Path:
    path = dist / f"{name}_{version}_all.deb"
    assert path.is_file(), f"{path.name} was not built; have {sorted(p.name for p in dist.iterdir())}"
    return path


@pytest.fixture(scope="module")
def root(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DebianRoot]:
    """A clean Debian 12 root (cached debootstrap base) with the three .debs installed by apt."""
    path = tmp_path_factory.mktemp("debian12") / "root"
    _ok(_run([str(CI / "debian-root.sh"), "create", str(path)], timeout=900))
    try:
        chroot = DebianRoot(path)
        chroot.apt("update")
        chroot.apt_install(*(_deb(dist, name) for name in DEBS))
        yield chroot
    finally:
        _ok(_run([str(CI / "debian-root.sh"), "destroy", str(path)]))


def test_debs_pass_lintian(dist: Path) -> None:
    proc = _run(["lintian", "--fail-on", "error", *(str(_deb(dist, n)) for n in DEBS)])
    errors = [line for line in proc.stdout.splitlines() if line.startswith("E:")]
    assert not errors, proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_debs_split_the_code_by_role(dist: Path) -> None:
    def files(name: str) -> list[str]:
        return [
            line.split()[-1] for line in _ok(_run(["dpkg-deb", "-c", str(_deb(dist, name))])).splitlines()
        ]

    site = "./usr/lib/python3/dist-packages/kvmeter"
    common, agent, collector = files("python3-kvmeter"), files("kvmeter-agent"), files("kvmeter-collector")
    assert f"{site}/cli.py" in common
    assert f"{site}/proto/kvmeter_pb2.py" in common
    assert "./usr/bin/kvmeter" in common
    assert not any(f.startswith((f"{site}/agent/", f"{site}/collector/")) for f in common)
    assert f"{site}/agent/cli.py" in agent
    assert not any(f.startswith(f"{site}/collector/") for f in agent)
    assert f"{site}/collector/cli.py" in collector
    assert f"{site}/collector/store/__init__.py" in collector  # subpackages go along
    assert not any(f.startswith(f"{site}/agent/") for f in collector)
    assert "./lib/systemd/system/kvmeter-agent.service" in agent
    assert "./lib/systemd/system/kvmeter-collector.service" in collector
    assert "./etc/kvmeter/tariff.toml" in collector  # packaging/config/tariff.toml.example
    for part, files_of_part in (("agent", agent), ("collector", collector)):  # packaging/monitoring
        assert f"./usr/share/kvmeter/grafana/kvmeter-{part}.json" in files_of_part
        assert f"./usr/share/kvmeter/prometheus/kvmeter-{part}.rules.yml" in files_of_part


def test_installed_from_debian_with_debian_libraries(root: DebianRoot) -> None:
    assert root.ok("kvmeter", "--version").strip() == f"kvmeter, version {VERSION}"
    owners = root.ok(
        "dpkg", "-S", "/usr/lib/python3/dist-packages/kvmeter/agent/cli.py",
        "/usr/lib/python3/dist-packages/kvmeter/collector/cli.py", "/usr/bin/kvmeter",
    )  # fmt: skip
    assert "kvmeter-agent:" in owners
    assert "kvmeter-collector:" in owners
    assert "python3-kvmeter:" in owners
    versions = dict(
        line.split("\t") for line in root.ok("dpkg-query", "-W", *DEBIAN_LIBRARIES).strip().splitlines()
    )
    for package, upstream in DEBIAN_LIBRARIES.items():
        assert versions[package].split("+")[0].split("-")[0] == upstream, (package, versions[package])
    # Nothing from PyPI: the only kvmeter on the path is the packaged one.
    where = root.ok(
        "python3", "-c", "import kvmeter.agent.cli, kvmeter.collector.cli as c; print(c.__file__)"
    )
    assert where.strip() == "/usr/lib/python3/dist-packages/kvmeter/collector/cli.py"


def _each_daemon_reads_only_its_own_config(root: DebianRoot) -> None:
    """The agent's user (on an exposed hypervisor) must not read the collector's database, Kafka
    and API credentials, nor the collector's user the agent's: root:kvmeter and
    root:kvmeter-collector 0640, and kvmeter-collector in no group kvmeter."""
    assert root.stat("/etc/kvmeter/agent.toml") == "root:kvmeter 640"
    assert root.stat("/etc/kvmeter/collector.toml") == "root:kvmeter-collector 640"
    assert "kvmeter" not in root.ok("id", "-nG", "kvmeter-collector").split()
    for user, own, other in (("kvmeter", "agent", "collector"), ("kvmeter-collector", "collector", "agent")):
        root.ok("head", "-c1", f"/etc/kvmeter/{own}.toml", user=user)
        denied = root.run("head", "-c1", f"/etc/kvmeter/{other}.toml", user=user)
        assert denied.returncode != 0, (user, other, denied)
        assert "Permission denied" in denied.stderr, (user, other, denied)


def _old_layout(root: DebianRoot) -> None:
    """What the earlier packages left: collector.toml root:kvmeter 0640 by the old postinst's stat
    override, kvmeter-collector in group kvmeter by the old sysusers line."""
    root.ok("dpkg-statoverride", "--remove", "/etc/kvmeter/collector.toml")
    root.ok(
        "dpkg-statoverride", "--update", "--add", "root", "kvmeter", "0640", "/etc/kvmeter/collector.toml"
    )
    root.ok("gpasswd", "-a", "kvmeter-collector", "kvmeter")
    assert root.stat("/etc/kvmeter/collector.toml") == "root:kvmeter 640"


def test_users_config_and_state_directories(root: DebianRoot) -> None:
    agent_groups = root.ok("id", "-nG", "kvmeter").split()
    collector_groups = root.ok("id", "-nG", "kvmeter-collector").split()
    assert "libvirt" not in agent_groups  # libvirt's read-only socket is open to all; the group manages
    assert collector_groups == ["kvmeter-collector"]
    _each_daemon_reads_only_its_own_config(root)
    assert root.ok("getent", "passwd", "kvmeter").split(":")[6].strip() in (
        "/usr/sbin/nologin",
        "/sbin/nologin",
    )
    assert root.stat("/var/lib/kvmeter/agent") == "kvmeter:kvmeter 750"
    assert root.stat("/var/lib/kvmeter/collector") == "kvmeter-collector:kvmeter-collector 750"
    conffiles = root.ok("dpkg-query", "-W", "-f", "${Conffiles}\n", "kvmeter-agent", "kvmeter-collector")
    assert "/etc/kvmeter/agent.toml" in conffiles
    assert "/etc/kvmeter/collector.toml" in conffiles
    assert "/etc/kvmeter/tariff.toml" in conffiles
    assert root.stat("/etc/kvmeter/tariff.toml") == "root:root 644"  # prices, no secret
    shipped = (root.path / "etc/kvmeter/tariff.toml").read_text()
    assert shipped == (TOP / "packaging/config/tariff.toml.example").read_text()
    loads = (
        "from kvmeter.collector.billing import tariff_file as t; "
        "print(t.load('/etc/kvmeter/tariff.toml', ['public']).currency)"
    )
    assert root.ok("python3", "-c", loads).strip() == "EUR"  # the installed code takes the installed file


def test_shipped_configs_point_into_the_writable_state_directories(root: DebianRoot) -> None:
    """ProtectSystem=strict leaves only StateDirectory= writable: the configs must agree."""
    agent = tomllib.loads((root.path / "etc/kvmeter/agent.toml").read_text())
    collector = tomllib.loads((root.path / "etc/kvmeter/collector.toml").read_text())
    assert agent["agent"]["state_dir"] == "/var/lib/kvmeter/agent"
    url = collector["store"]["url"]
    assert url.startswith("sqlite:////var/lib/kvmeter/collector/"), (
        f"collector.toml's store {url} is outside StateDirectory=kvmeter/collector: "
        "the service user cannot create it there"
    )


def _verify(root: DebianRoot, unit: str) -> str:
    proc = root.run("systemd-analyze", "verify", unit)
    return (proc.stdout + proc.stderr).strip() + ("" if proc.returncode == 0 else f"\nexit {proc.returncode}")


def test_units_pass_systemd_analyze(root: DebianRoot) -> None:
    # verify exits 0 on unknown keys; it only warns. So any output at all is a finding.
    broken = root.path / "tmp/kvmeter-broken.service"
    broken.write_text("[Service]\nExecStart=/usr/bin/kvmeter agent\nPrivateNetwrk=yes\n")
    assert "Unknown key" in _verify(root, "/tmp/kvmeter-broken.service")  # the check can fail
    for unit in ("kvmeter-agent.service", "kvmeter-collector.service"):
        assert _verify(root, f"/lib/systemd/system/{unit}") == "", unit
        report = root.ok("systemd-analyze", "security", "--offline=yes", f"/lib/systemd/system/{unit}")
        exposure = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", report).group(1))  # type: ignore[union-attr]
        assert exposure <= 2.5, f"{unit}: exposure {exposure}\n{report}"
    agent = (root.path / "lib/systemd/system/kvmeter-agent.service").read_text()
    assert not re.search(r"^PrivateNetwork=", agent, re.MULTILINE)  # counters are per namespace
    assert "AF_NETLINK" in agent
    assert "ProtectSystem=strict" in agent
    assert "StateDirectory=kvmeter/agent" in agent
    assert "Restart=on-failure" in agent


@pytest.fixture(scope="module")
def agent_batch(root: DebianRoot) -> dict[str, Any]:
    """`kvmeter agent --once --format json` as the kvmeter user, inside the root, on a simulated
    KVM host: a VM with one public NIC in its own namespace, libvirt's test driver describing it.
    The VM sends UDP to its gateway while the agent measures."""
    lab = Lab()
    try:
        host = lab.add_host("pkg")
        vm = host.add_vm("i-2-10-VM", VM_UUID, [("cloudbr0", VM_MAC, "198.51.100.10/24")])
        host.write_libvirt_xml(
            root.path / "tmp/node.xml", owners={"i-2-10-VM": {"ownerAccountUuid": ACCOUNT}}
        )
        example = (root.path / "etc/kvmeter/agent.toml").read_text()
        assert 'uri = "qemu:///system"' in example
        (root.path / "tmp/agent-ci.toml").write_text(
            example.replace('uri = "qemu:///system"', 'uri = "test:///tmp/node.xml"')
        )
        root.ok("chgrp", "kvmeter", "/tmp/agent-ci.toml")
        root.ok("chmod", "0640", "/tmp/agent-ci.toml")
        # A private mount namespace (ip netns exec): sysfs of the host namespace inside the root.
        script = (
            f"mount -t sysfs sysfs {root.path}/sys && exec "
            + " ".join(root.argv("kvmeter", "agent", "--once", "--format", "json", "--config",
                                 "/tmp/agent-ci.toml", "--window", "2", user="kvmeter"))
        )  # fmt: skip
        proc = host.popen("sh", "-c", script, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=CLEAN_ENV)
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                vm.send("198.51.100.1", 20_000)
                stop.wait(0.05)

        sender = threading.Thread(target=traffic, daemon=True)
        sender.start()
        try:
            out, err = proc.communicate(timeout=120)
        finally:
            stop.set()
            sender.join(timeout=10)
        assert proc.returncode == 0, f"agent --once exited {proc.returncode}\n{err.decode()[-4000:]}"
        (root.path / "tmp/once.json").write_bytes(out)
        batch = json.loads(out)
        batch["_vm_side"] = vm.nics[0].counters()
        return batch
    finally:
        lab.close()


def test_agent_once_meters_the_vm(agent_batch: dict[str, Any]) -> None:
    ours = [m for m in agent_batch.get("measures", []) if m.get("mac") == VM_MAC]
    assert ours, f"no measure for {VM_MAC}: {agent_batch}"
    assert {m.get("instance_uuid") for m in ours} == {VM_UUID}
    assert {m.get("domain_name") for m in ours} == {"i-2-10-VM"}
    assert {m.get("traffic_type") for m in ours} == {"PUBLIC"}  # cloudbr0
    sent = sum(int(m.get("bytes", 0)) for m in ours if m.get("direction") == "VM_TX")
    # The window saw part of the traffic: something, and never more than the VM itself sent.
    assert 0 < sent <= agent_batch["_vm_side"]["tx_bytes"]


def test_ingest_and_usage_round_trip_on_sqlite(root: DebianRoot, agent_batch: dict[str, Any]) -> None:
    """The agent's batch, ingested as the collector user into the store the shipped config names,
    comes back from `kvmeter usage` as byte records of the VM's owner, to the byte."""
    url = tomllib.loads((root.path / "etc/kvmeter/collector.toml").read_text())["store"]["url"]
    starts = [int(m["start"]) for m in agent_batch["measures"]]
    # The owner comes from CloudStack's event bus: the VM was created an hour before.
    created = dt.datetime.fromtimestamp(min(starts) / 1000 - 3600, dt.UTC)
    event = {
        "account": ACCOUNT, "zone": ZONE, "event": "VM.CREATE", "resource": "com.cloud.vm.VirtualMachine",
        "id": VM_UUID, "eventDateTime": created.strftime("%Y-%m-%d %H:%M:%S +0000"),
    }  # fmt: skip
    (root.path / "tmp/events.jsonl").write_text(json.dumps(event) + "\n")
    billed = {"VM_TX": 0, "VM_RX": 0}
    for m in agent_batch.get("measures", []):
        if m.get("traffic_type") == "PUBLIC" and not m.get("quarantined"):
            billed[m["direction"]] += int(m.get("bytes", 0))
    assert billed["VM_TX"] > 0
    day = 24 * 3600 * 1000
    first, last = min(starts) // day * day, (max(starts) // day + 2) * day
    root.ok(
        "kvmeter", "ingest", "--config", "/etc/kvmeter/collector.toml", "--db", url,
        "--events", "/tmp/events.jsonl", "--measures", "/tmp/once.json", "--now", str(last + 3 * day),
        user="kvmeter-collector",
    )  # fmt: skip
    report = root.ok(
        "kvmeter", "usage", "--db", url, "--start", str(first), "--end", str(last), "--format", "json",
        user="kvmeter-collector",
    )  # fmt: skip
    rows = json.loads(report)
    assert rows, report
    assert {r["account"] for r in rows} == {ACCOUNT}, rows
    by_type = {4: 0, 5: 0}
    for r in rows:
        if r["usage_type"] in by_type:
            by_type[r["usage_type"]] += int(r["rawusage"])
    # CloudStack's 4 = bytes sent by the VM, 5 = bytes it received.
    assert by_type == {4: billed["VM_TX"], 5: billed["VM_RX"]}, (by_type, billed)


def test_a_credit_added_twice_under_its_key_on_sqlite_with_debians_sqlalchemy(root: DebianRoot) -> None:
    """`kvmeter credits add --idempotency-key` run again adds nothing, on SQLite with Debian 12's
    SQLAlchemy 1.4.46, which compiles no RETURNING for SQLite (the insert that skips a taken key,
    shared with the balance alerts, used it: a CompileError on the packaged default store)."""
    db = "sqlite:////tmp/credits-ci.db"
    add = ("kvmeter", "credits", "add", "--db", db, "--account", ACCOUNT, "--amount", "25.00")
    first = root.ok(*add, "--currency", "EUR", "--idempotency-key", "payment-1")
    again = root.ok(*add, "--currency", "EUR", "--idempotency-key", "payment-1")
    assert "added before" not in first, first
    assert "added before" in again, again
    listed = json.loads(root.ok("kvmeter", "credits", "list", "--db", db, "--format", "json"))
    assert [(c["amount"], c["idempotency_key"]) for c in listed] == [("25.00", "payment-1")], listed


PROBE = """#!/bin/sh
# Boot probe: let the services run for a while, record how they run, power off.
out=/var/lib/kvmeter-ci
sleep 10
for unit in kvmeter-agent kvmeter-collector; do
    systemctl show -p ActiveState -p SubState -p NRestarts -p MainPID "$unit" >"$out/$unit.show"
    pid=$(systemctl show -p MainPID --value "$unit")
    [ "$pid" != 0 ] && stat -c %U "/proc/$pid" >"$out/$unit.user"
    journalctl -b -u "$unit" --no-pager -o cat >"$out/$unit.journal"
done
url=http://127.0.0.1:9477/metrics
python3 -c "import sys, urllib.request as u; print(u.urlopen(sys.argv[1]).read().decode())" "$url" \
    >"$out/agent.metrics" 2>&1
systemctl is-active libvirtd.service libvirtd-ro.socket >"$out/libvirtd.active"
find /var/lib/kvmeter -printf '%u %p\\n' >"$out/state.list"
systemctl poweroff
"""


def _service_state(root: DebianRoot, unit: str) -> dict[str, str]:
    show = (root.path / f"var/lib/kvmeter-ci/{unit}.show").read_text()
    return dict(line.split("=", 1) for line in show.split())


def test_services_run_under_their_units(root: DebianRoot) -> None:
    """Boot the root's systemd (nspawn, private network) with libvirt's daemon installed, as on a
    KVM host, and both services enabled with their shipped configs (Kafka unreachable). Both must
    stay up as their users under every hardening directive; the agent must reach libvirtd at
    qemu:///system at the first attempt, spool its batches and serve its metrics."""
    root.apt("install", "-y", "--no-install-recommends", "libvirt-daemon-system")
    ci = root.path / "var/lib/kvmeter-ci"
    ci.mkdir(mode=0o755)
    probe = root.path / "usr/local/sbin/kvmeter-ci-probe"
    probe.write_text(PROBE)
    probe.chmod(0o755)
    (root.path / "etc/systemd/system/kvmeter-ci-probe.service").write_text(
        "[Unit]\nAfter=multi-user.target kvmeter-agent.service kvmeter-collector.service\n"
        "[Service]\nType=oneshot\nExecStart=/usr/local/sbin/kvmeter-ci-probe\n"
    )
    wants = root.path / "etc/systemd/system/multi-user.target.wants/kvmeter-ci-probe.service"
    wants.symlink_to("/etc/systemd/system/kvmeter-ci-probe.service")
    try:
        boot = _run([str(CI / "debian-root.sh"), "boot", str(root.path)], timeout=240)
        assert boot.returncode == 0, boot.stdout[-3000:] + boot.stderr[-3000:]
        journals = {u: (ci / f"{u}.journal").read_text() for u in ("kvmeter-agent", "kvmeter-collector")}
        for unit, user in (("kvmeter-agent", "kvmeter"), ("kvmeter-collector", "kvmeter-collector")):
            state = _service_state(root, unit)
            running = (state["ActiveState"], state["SubState"], state["NRestarts"])
            assert running == ("active", "running", "0"), (unit, state, journals[unit][-3000:])
            assert (ci / f"{unit}.user").read_text().strip() == user
            assert "Traceback" not in journals[unit], journals[unit][-3000:]
        assert (ci / "libvirtd.active").read_text().split() == ["active", "active"]
        for trouble in ("cannot connect to libvirt", "no inventory from libvirt", "libvirt call failed"):
            assert trouble not in journals["kvmeter-agent"], journals["kvmeter-agent"][-3000:]
        spool = [line.split() for line in (ci / "state.list").read_text().splitlines()]
        assert any(p.startswith("/var/lib/kvmeter/agent/spool/") and u == "kvmeter" for u, p in spool), spool
        metrics = (ci / "agent.metrics").read_text()
        assert re.search(r"^kvmeter_agent_polls_total [1-9]", metrics, re.MULTILINE), metrics
        assert re.search(r"^kvmeter_agent_libvirt_reconnects 0", metrics, re.MULTILINE), metrics
    finally:
        wants.unlink()


def _repack(deb: Path, out: Path, version: str) -> Path:
    """The same package as a newer version (what an upgrade looks like to dpkg)."""
    tree = out / deb.stem
    _ok(_run(["dpkg-deb", "-R", str(deb), str(tree)]))
    control = tree / "DEBIAN/control"
    control.write_text(control.read_text().replace(f"(= {VERSION})", f"(= {version})").replace(
        f"Version: {VERSION}", f"Version: {version}"
    ))  # fmt: skip
    name = deb.name.split("_")[0]
    target = out / f"{name}_{version}_all.deb"
    _ok(_run(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(target)]))
    return target


def test_rpm_post_moves_the_old_layout(root: DebianRoot, dist: Path) -> None:
    """An RPM upgrade keeps an edited collector.toml (noreplace) with its old owner, root:kvmeter,
    and sysusers keeps kvmeter-collector in kvmeter: kvmeter-collector's %post must end with the
    new layout. Run here on the Debian root brought to the old layout, as rpm runs it ($1 = 2)."""
    scripts = _ok(_run(["rpm", "-qp", "--scripts", str(_rpm(dist, "kvmeter-collector"))]))
    post = scripts.split("postinstall scriptlet (using /bin/sh):\n", 1)[1].split(
        "\npreuninstall scriptlet", 1
    )[0]
    (root.path / "tmp/rpm-post.sh").write_text(post)
    _old_layout(root)
    root.ok("sh", "-e", "/tmp/rpm-post.sh", "2")
    _each_daemon_reads_only_its_own_config(root)
    root.ok("sh", "-e", "/tmp/rpm-post.sh", "2")  # again: nothing left to move
    root.ok("chgrp", "adm", "/etc/kvmeter/collector.toml")  # an admin's own owner stays
    root.ok("sh", "-e", "/tmp/rpm-post.sh", "2")
    assert root.stat("/etc/kvmeter/collector.toml") == "root:adm 640"
    root.ok("chgrp", "kvmeter-collector", "/etc/kvmeter/collector.toml")


def test_upgrade_keeps_config_and_spool_purge_removes_data(
    root: DebianRoot, dist: Path, tmp_path: Path
) -> None:
    # Runs last: it upgrades, removes and purges the packages of the shared root.
    with (root.path / "etc/kvmeter/agent.toml").open("a") as f:
        f.write("\n# local change by the operator\n")
    with (root.path / "etc/kvmeter/collector.toml").open("a") as f:
        f.write("\n# local change by the operator\n")
    _old_layout(root)  # installed by the earlier packages: each daemon could read the other's config
    (root.path / "var/lib/kvmeter/agent/spool-marker").write_text("undelivered")
    root.ok("chown", "kvmeter:kvmeter", "/var/lib/kvmeter/agent/spool-marker")

    newer = f"{VERSION}+upgrade1"
    root.apt_install(*(_repack(_deb(dist, n), tmp_path, newer) for n in DEBS))
    assert root.ok("dpkg-query", "-W", "-f", "${Version}", "kvmeter-agent") == newer
    assert "# local change by the operator" in (root.path / "etc/kvmeter/agent.toml").read_text()
    assert (root.path / "var/lib/kvmeter/agent/spool-marker").read_text() == "undelivered"
    assert "# local change by the operator" in (root.path / "etc/kvmeter/collector.toml").read_text()
    _each_daemon_reads_only_its_own_config(root)
    overrides = root.ok("dpkg-statoverride", "--list", "/etc/kvmeter/collector.toml").split()
    assert overrides == ["root", "kvmeter-collector", "640", "/etc/kvmeter/collector.toml"]

    root.apt("remove", "-y", "kvmeter-agent", "kvmeter-collector")
    assert (root.path / "etc/kvmeter/agent.toml").exists()
    assert (root.path / "var/lib/kvmeter/agent/spool-marker").exists()

    root.apt("purge", "-y", "kvmeter-agent", "kvmeter-collector")
    assert not (root.path / "etc/kvmeter/agent.toml").exists()
    assert not (root.path / "var/lib/kvmeter/agent").exists()
    assert not (root.path / "var/lib/kvmeter/collector").exists()
    assert "/etc/kvmeter/" not in root.run("dpkg-statoverride", "--list").stdout
    # Debian policy: system users stay (files they owned may remain elsewhere).
    assert root.run("getent", "passwd", "kvmeter").returncode == 0


def _rpm(dist: Path, name: str) -> Path:
    path = dist / f"{name}-{VERSION}-1.noarch.rpm"
    assert path.is_file(), f"{path.name} was not built; have {sorted(p.name for p in dist.iterdir())}"
    return path


def test_rpms_files_requirements_and_scriptlets(dist: Path) -> None:
    def query(name: str, *what: str) -> str:
        return _ok(_run(["rpm", "-qp", *what, str(_rpm(dist, name))]))

    common, agent = query("python3-kvmeter", "--requires"), query("kvmeter-agent", "--requires")
    collector = query("kvmeter-collector", "--requires")
    assert "python(abi) = 3.9" in common
    assert "python3.9dist(protobuf) >= 3.20" in common
    assert "python3.9dist(tomli) >= 1.2" in common
    for needed in ("python3.9dist(confluent-kafka) >= 1.7",
                   "python3.9dist(libvirt-python)", f"python3-kvmeter = {VERSION}-1",
                   "/usr/bin/kill"):  # fmt: skip
        assert needed in agent, (needed, agent)
    assert "pyroute2" not in agent  # never imported by the agent; EL9 has none new enough
    for needed in ("python(abi) = 3.11", "python3.11dist(sqlalchemy) >= 2.0",
                   "python3.11dist(psycopg) >= 3.1", f"python3.11-kvmeter = {VERSION}-1",
                   "/usr/bin/kill"):  # fmt: skip
        assert needed in collector, (needed, collector)

    scripts = query("kvmeter-agent", "--scripts")
    assert "systemd-sysusers --replace=/usr/lib/sysusers.d/kvmeter-agent.conf" in scripts
    assert "u kvmeter - " in scripts  # the sysusers lines are embedded for %pre
    assert "m kvmeter libvirt" not in scripts  # read-only socket: no libvirt group (it manages VMs)
    assert re.search(r"preuninstall scriptlet.*\n.*disable --now kvmeter-agent.service", scripts) or (
        "systemd-update-helper" in scripts
    )
    assert "try-restart kvmeter-agent.service" in scripts or "systemd-update-helper" in scripts

    listing = query("kvmeter-agent", "--list", "-v")
    assert re.search(r"-rw-r-----\s+\d+\s+root\s+kvmeter\s.*/etc/kvmeter/agent.toml", listing), listing
    # -v cuts owner names at 8 characters (kvmeter-): the full names from the header.
    owners = query(
        "kvmeter-collector", "--qf", "[%{FILEUSERNAME}:%{FILEGROUPNAME} %{FILEMODES:perms} %{FILENAMES}\n]"
    )
    assert "root:kvmeter-collector -rw-r----- /etc/kvmeter/collector.toml" in owners.splitlines(), owners
    assert "m kvmeter-collector kvmeter" not in query("kvmeter-collector", "--scripts")
    assert "/usr/lib/python3.9/site-packages/kvmeter/agent/cli.py" in listing
    assert "/usr/lib/systemd/system/kvmeter-agent.service" in listing
    assert "/usr/lib/python3.11/site-packages/kvmeter/collector/cli.py" in query(
        "kvmeter-collector", "--list"
    )
    assert "/usr/share/kvmeter/grafana/kvmeter-agent.json" in listing
    assert "/usr/share/kvmeter/prometheus/kvmeter-agent.rules.yml" in listing
    collector_files = query("kvmeter-collector", "--list")
    assert "/usr/share/kvmeter/grafana/kvmeter-collector.json" in collector_files
    assert "/usr/share/kvmeter/prometheus/kvmeter-collector.rules.yml" in collector_files
    assert re.search(
        r"-rw-r--r--\s+\d+\s+root\s+root\s.*/etc/kvmeter/tariff.toml",
        query("kvmeter-collector", "--list", "-v"),
    )
    assert query("kvmeter-collector", "--configfiles").split() == [
        "/etc/kvmeter/collector.toml",
        "/etc/kvmeter/tariff.toml",
    ]
    common_files = query("python3-kvmeter", "--list")
    assert "/usr/bin/kvmeter" in common_files
    assert "/kvmeter/collector/" not in common_files
    configs = query("kvmeter-agent", "--configfiles")
    assert configs.strip() == "/etc/kvmeter/agent.toml"


def test_rpms_pass_rpmlint(dist: Path) -> None:
    rpms = [
        str(_rpm(dist, n))
        for n in ("python3-kvmeter", "python3.11-kvmeter", "kvmeter-agent", "kvmeter-collector")
    ]
    proc = _run(["rpmlint", "-r", str(TOP / "packaging/rpm/rpmlintrc"), *rpms])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " 0 errors" in proc.stdout, proc.stdout


@pytest.mark.parametrize("part", ["agent", "collector"])
def test_units_documentation_is_shipped_where_they_say(dist: Path, part: str) -> None:
    """`systemctl status kvmeter-<part>` shows the unit's Documentation=file:... path; the .deb
    and the .rpm that install the unit ship that file there. Debian's dh_compress made it
    README.md.gz, and the RPM called it README.packaging.md under <package>-<version>/."""
    unit = (TOP / f"packaging/systemd/kvmeter-{part}.service").read_text()
    docs = re.findall(r"^Documentation=file:(\S+)", unit, re.MULTILINE)
    assert docs, unit
    deb = dist / f"kvmeter-{part}_{VERSION}_all.deb"
    rpm = dist / f"kvmeter-{part}-{VERSION}-1.noarch.rpm"
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True)
    deb_files = {line.split()[-1].lstrip(".") for line in listing.stdout.splitlines()}
    rpm_list = subprocess.run(["rpm", "-qpl", str(rpm)], capture_output=True, text=True, check=True)
    rpm_files = set(rpm_list.stdout.split())
    for path in docs:
        assert path in deb_files, (path, sorted(f for f in deb_files if "/doc/" in f))
        assert path in rpm_files, (path, sorted(f for f in rpm_files if "/doc/" in f))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
