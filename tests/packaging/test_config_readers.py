"""Who can read the daemons' configs, from the tree's own packaging files (cheap: no package
build). The install and upgrade of the real packages are checked in test_packages.py."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.packaging

TOP = Path(__file__).resolve().parents[2]
AGENT, COLLECTOR = "/etc/kvmeter/agent.toml", "/etc/kvmeter/collector.toml"
# What the earlier packages' sysusers.d/kvmeter-collector.conf made: the collector in group kvmeter.
OLD_COLLECTOR_SYSUSERS = (
    'g kvmeter -\nu kvmeter-collector - "kvmeter collector" /var/lib/kvmeter\nm kvmeter-collector kvmeter\n'
)
# dpkg-statoverride resolves names through the host's NSS, so on a scratch root it is a stub
# that keeps the overrides in a file, one `owner group mode path` a line (mode as --list prints it).
STATOVERRIDE = r"""#!/bin/sh
db="$DPKG_ROOT/statoverride"
touch "$db"
case "$1" in
--list) grep " $2\$" "$db" ;;
--remove) grep -v " $2\$" "$db" >"$db.new" || true; mv "$db.new" "$db" ;;
--update)
	[ "$2" = --add ] || exit 2
	grep -q " $6\$" "$db" && { echo "An override for '$6' already exists" >&2; exit 2; }
	echo "$3 $4 ${5#0} $6" >>"$db"
	;;
*) exit 2 ;;
esac
"""


def _scratch_root(tmp_path: Path, sysusers: dict[str, str]) -> Path:
    root = tmp_path / "root"
    (root / "etc/kvmeter").mkdir(parents=True)
    (root / "usr/lib/sysusers.d").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")
    (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")
    (root / "etc/gshadow").write_text("root:*::\n")
    for name, text in sysusers.items():
        (root / f"usr/lib/sysusers.d/{name}").write_text(text)
    proc = subprocess.run(["systemd-sysusers", f"--root={root}"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return root


def _groups_of(root: Path, user: str) -> set[str]:
    primary = {
        line.split(":")[0]: line.split(":")[3]
        for line in (root / "etc/passwd").read_text().split("\n")
        if line
    }
    groups = set()
    for line in (root / "etc/group").read_text().split("\n"):
        if not line:
            continue
        name, _, gid, members = line.split(":")
        if gid == primary[user] or user in members.split(","):
            groups.add(name)
    return groups


def _postinst(root: Path, tmp_path: Path, override: str | None) -> str:
    """kvmeter-collector.postinst configure on root; returns the stat override it leaves."""
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    (stubs / "dpkg-statoverride").write_text(STATOVERRIDE)
    (stubs / "dpkg-statoverride").chmod(0o755)
    if override:
        (root / "statoverride").write_text(override + "\n")
    script = TOP / "packaging/debian/kvmeter-collector.postinst"
    env = {"PATH": f"{stubs}:/usr/sbin:/usr/bin:/sbin:/bin", "DPKG_ROOT": str(root), "LANG": "C"}
    proc = subprocess.run(
        ["sh", str(script), "configure", "0.1.0"], capture_output=True, text=True, env=env, cwd=root
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return (root / "statoverride").read_text().strip()


def _sysusers() -> dict[str, str]:
    return {
        f"kvmeter-{p}.conf": (TOP / f"packaging/sysusers.d/kvmeter-{p}.conf").read_text()
        for p in ("agent", "collector")
    }


def test_each_daemons_user_reads_only_its_own_config(tmp_path: Path) -> None:
    """On a host with both packages, the agent's user (kvmeter, the daemon of an exposed
    hypervisor) must not read collector.toml (database password, Kafka SASL and API
    credentials), nor the collector's user (kvmeter-collector) agent.toml. Both configs were
    root:kvmeter 0640 and kvmeter-collector was a member of kvmeter (sysusers, and
    SupplementaryGroups=kvmeter in its unit): each read the other's. Correct: agent.toml
    root:kvmeter 0640, collector.toml root:kvmeter-collector 0640 (the .deb's stat override and the
    .rpm's %attr), and the collector's user in no group kvmeter."""
    root = _scratch_root(tmp_path, _sysusers())
    groups = {u: _groups_of(root, u) for u in ("kvmeter", "kvmeter-collector")}
    for part, user in (("agent", "kvmeter"), ("collector", "kvmeter-collector")):
        unit = (TOP / f"packaging/systemd/kvmeter-{part}.service").read_text()
        for line in re.findall(r"^SupplementaryGroups=(.*)$", unit, re.MULTILINE):
            groups[user].update(line.split())
    spec = (TOP / "packaging/rpm/kvmeter.spec").read_text()
    rpm_group = {
        path: re.search(r"%attr\(0640,root,([\w-]+)\) %\{_sysconfdir\}" + re.escape(path[4:]), spec).group(1)  # type: ignore[union-attr]
        for path in (AGENT, COLLECTOR)
    }
    deb = _postinst(root, tmp_path, None).split()
    deb_group = {COLLECTOR: deb[1]}
    agent_postinst = (TOP / "packaging/debian/kvmeter-agent.postinst").read_text()
    deb_group[AGENT] = re.search(r"--add root ([\w-]+) 0640 /etc/kvmeter/agent.toml", agent_postinst).group(1)  # type: ignore[union-attr]
    assert deb[2:] == ["640", COLLECTOR]
    for fmt, owner in (("deb", deb_group), ("rpm", rpm_group)):
        readers = {path: {u for u, g in groups.items() if owner[path] in g} for path in (AGENT, COLLECTOR)}
        assert readers == {AGENT: {"kvmeter"}, COLLECTOR: {"kvmeter-collector"}}, (fmt, owner, groups)


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (
            "root kvmeter 640 /etc/kvmeter/collector.toml",
            "root kvmeter-collector 640 /etc/kvmeter/collector.toml",
        ),
        ("root adm 600 /etc/kvmeter/collector.toml", "root adm 600 /etc/kvmeter/collector.toml"),
    ],
    ids=["old-default", "admin-override"],
)
def test_debian_upgrade_from_the_old_layout(tmp_path: Path, before: str, after: str) -> None:
    """A Debian host that installed the earlier kvmeter-collector has the stat override
    `root kvmeter 0640` on collector.toml (made by the old postinst) and kvmeter-collector in group
    kvmeter (the old sysusers line; sysusers never removes a member). The new postinst must replace
    exactly that old default with root:kvmeter-collector 0640, leave an admin's own different
    override as it is, and take kvmeter-collector out of kvmeter: otherwise the upgrade keeps
    every daemon able to read the other's credentials."""
    old = {
        "kvmeter-agent.conf": _sysusers()["kvmeter-agent.conf"],
        "kvmeter-collector.conf": OLD_COLLECTOR_SYSUSERS,
    }
    root = _scratch_root(tmp_path, old)
    assert "kvmeter" in _groups_of(root, "kvmeter-collector")  # the old layout
    (root / "usr/lib/sysusers.d/kvmeter-collector.conf").write_text(_sysusers()["kvmeter-collector.conf"])
    assert _postinst(root, tmp_path, before) == after
    assert _groups_of(root, "kvmeter-collector") == {"kvmeter-collector"}
    assert _groups_of(root, "kvmeter") == {"kvmeter"}
