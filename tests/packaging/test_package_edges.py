"""Packaging at its edges, from the tree's own files: the agent's RPM requirements against its
imports, a subcommand whose package is not installed, the man page's commands, the agent's user
outside the libvirt group, units that restart a daemon SIGHUP ended."""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
from pathlib import Path

import libvirt
import pytest
from click.testing import CliRunner

from kvmeter.agent.inventory import Inventory
from kvmeter.cli import SUBCOMMANDS, main

pytestmark = pytest.mark.packaging

TOP = Path(__file__).resolve().parents[2]
# Python-dist names whose import name differs.
IMPORT_NAMES = {"libvirt-python": "libvirt", "confluent-kafka": "confluent_kafka"}


def _imports(*dirs: Path) -> set[str]:
    """Top-level modules imported anywhere (module level or inside functions) under dirs."""
    names: set[str] = set()
    for d in dirs:
        for path in d.glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names


def test_agent_rpm_requires_only_libraries_the_agent_imports() -> None:
    """kvmeter-agent's RPM requires the Python libraries the agent's code imports, and no others:
    a requirement the code never uses only makes the package uninstallable where that library is
    missing or too old. pyroute2 is one: the agent decodes netlink itself (kvmeter.agent.rtnl,
    LinkDump), yet the RPM required python3.9dist(pyroute2) >= 0.7.2, which EL9 and EPEL 9
    (0.5.14) cannot satisfy."""
    spec = (TOP / "packaging/rpm/kvmeter.spec").read_text()
    section = spec.split("%package -n kvmeter-agent", 1)[1].split("%description", 1)[0]
    required = re.findall(r"^Requires:\s+%\{py_dist ([\w.-]+)\}", section, re.MULTILINE)
    assert "libvirt-python" in required  # the section was found
    imported = _imports(TOP / "agent", TOP / "src/kvmeter", TOP / "proto")
    unused = [d for d in required if IMPORT_NAMES.get(d, d.replace("-", "_").lower()) not in imported]
    assert unused == [], f"kvmeter-agent requires {unused}, which the agent never imports"


@pytest.mark.parametrize(
    ("absent", "argv", "package"),
    [
        ("kvmeter.collector", ["usage", "--help"], "kvmeter-collector"),  # on an agent-only host
        ("kvmeter.agent", ["agent", "--once"], "kvmeter-agent"),  # on a collector-only host
    ],
)
def test_subcommand_of_a_package_not_installed_says_so(
    monkeypatch: pytest.MonkeyPatch, absent: str, argv: list[str], package: str
) -> None:
    """python3-kvmeter's `kvmeter` lists every subcommand, but a host has kvmeter-agent or
    kvmeter-collector (on EL9 the collector is only in Python 3.11's site-packages). A subcommand
    whose part is not installed exits 1 with a sentence naming the package, not a traceback."""
    for name in [m for m in sys.modules if m == absent or m.startswith(absent + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, absent, None)  # what the package split leaves: no such module
    result = CliRunner().invoke(main, argv)
    assert not isinstance(result.exception, ImportError), "a traceback for a missing package"
    assert result.exit_code == 1
    assert package in result.output, result.output
    assert absent in result.output, result.output


def test_man_page_lists_every_subcommand() -> None:
    """kvmeter(1) (packaging/man/kvmeter.1, shipped in python3-kvmeter) describes every command
    `kvmeter --help` lists: reconcile, corrections, credentials and dead-letters were missing."""
    page = (TOP / "packaging/man/kvmeter.1").read_text()
    commands = page.split(".SH COMMANDS", 1)[1].split("\n.SH ", 1)[0]
    documented = {m.replace("\\-", "-") for m in re.findall(r"^\.TP\n\.B (\S+)", commands, re.MULTILINE)}
    assert documented == set(SUBCOMMANDS)


def test_agent_user_is_not_in_the_libvirt_group(tmp_path: Path) -> None:
    """The agent opens libvirt read-only (openReadOnly), through the read-only socket that libvirt
    opens to every user (libvirtd-ro.socket, virtqemud-ro.socket: SocketMode=0666). Membership of
    the libvirt group is not needed for that, and it grants more: libvirt's polkit rule (Debian's
    60-libvirt.rules, EL's 50-libvirt.rules) lets its members manage libvirt, i.e. define and
    control every VM of the hypervisor. The packages must not put the agent's user in it (neither
    sysusers' `m kvmeter libvirt` nor the unit's SupplementaryGroups=libvirt)."""
    assert inspect.signature(Inventory).parameters["opener"].default is libvirt.openReadOnly
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "usr/lib/sysusers.d").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\nlibvirt:x:120:\n")  # a KVM host has libvirt
    conf = (TOP / "packaging/sysusers.d/kvmeter-agent.conf").read_text()
    (root / "usr/lib/sysusers.d/kvmeter-agent.conf").write_text(conf)
    proc = subprocess.run(
        ["systemd-sysusers", f"--root={root}", "kvmeter-agent.conf"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    groups = {
        line.split(":")[0]: line.split(":")[3].split(",") for line in (root / "etc/group").read_text().split()
    }
    assert "kvmeter" in (root / "etc/passwd").read_text()  # the user was made
    assert "kvmeter" not in groups["libvirt"]
    unit = (TOP / "packaging/systemd/kvmeter-agent.service").read_text()
    supplementary = re.findall(r"^SupplementaryGroups=(.*)$", unit, re.MULTILINE)
    assert not any("libvirt" in line.split() for line in supplementary), supplementary


@pytest.mark.parametrize("part", ["agent", "collector"])
def test_units_restart_a_daemon_that_sighup_ended(part: str) -> None:
    """The units reload with ExecReload=kill -HUP, and they are Type=exec: active, so open to
    `systemctl reload`, from the exec on, while the daemon takes a second or more before it can
    take SIGHUP (`import kvmeter.collector.cli` alone takes 0.6 s; the daemons hold SIGHUP only
    from their command's first step). Until then SIGHUP's default action ends the process, and
    systemd counts a death by SIGHUP as clean: Restart=on-failure does not start it again, and the
    host stays unmetered (agent) or nothing is billed (collector) until someone notices. The
    units must restart a daemon that SIGHUP ended (RestartForceExitStatus=SIGHUP)."""
    unit = (TOP / f"packaging/systemd/kvmeter-{part}.service").read_text()
    assert re.search(r"^ExecReload=\S*kill -HUP ", unit, re.MULTILINE)
    assert re.search(r"^Type=exec$", unit, re.MULTILINE)
    forced = re.findall(r"^RestartForceExitStatus=(.*)$", unit, re.MULTILINE)
    assert any("SIGHUP" in line.split() for line in forced), forced
