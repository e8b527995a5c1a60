"""A host namespace with N VM interfaces: veth pairs whose host end `tapN` sits on a bridge, as a
KVM host's taps do, and whose VM end sits in a second namespace. A Linux bridge takes at most
1,024 ports, so the taps spread over guest bridges `brvx-<vni>` of PORTS_PER_BRIDGE each.

Built with `ip -batch` (10,000 pairs take ~20 s instead of minutes) and grown in place, so one
namespace serves every size of a run. No addresses are configured: the traffic pusher
(bench.frames) sends raw frames, and nothing leaves the two namespaces.
"""

from __future__ import annotations

import secrets
import subprocess
import tempfile
from pathlib import Path

from tests.harness.netns import sh

PORTS_PER_BRIDGE = 500
FIRST_VNI = 5001
# Every bridge gets this MAC, so one frame addressed to it is delivered locally on any of them.
BRIDGE_MAC = "02:00:00:00:00:fe"
# The taps' names. Not libvirt's own vnetN: its XML parser drops a defined domain's target dev of
# that prefix (names it generates itself), so the test driver's domains would name testnetN and
# the agent would match every NIC by MAC, where a QEMU host's live XML names each tap.
TAP_PREFIX = "tap"


def _batch(ns: str, lines: list[str], *, force: bool = False) -> None:
    """Run `ip` commands in one batch; `force`: go on past a failing line (fail at the end)."""
    if not lines:
        return
    with tempfile.NamedTemporaryFile("w", prefix="kvmeter-bench-", suffix=".ip") as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        result = subprocess.run(
            ["ip", "-n", ns, *(["-force"] if force else []), "-batch", f.name],
            capture_output=True,
            text=True,
            check=False,
        )
    if result.returncode != 0:
        raise RuntimeError(f"ip -n {ns} -batch failed: {result.stderr.strip()[-2000:]}")


def _new_ns(name: str) -> None:
    sh("ip", "netns", "add", name)
    sh("ip", "link", "set", "lo", "up", ns=name)
    for key in ("all", "default"):  # no IPv6 chatter moving bytes behind the benchmark's back
        sh("sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1", ns=name)


class VethHost:
    """`host_ns` holds the guest bridges brvx-<vni> and tap0..tap{n-1}; `vm_ns` holds their peers eth0..."""

    def __init__(self) -> None:
        tag = "kvb" + secrets.token_hex(2)
        self.host_ns = f"{tag}-host"
        self.vm_ns = f"{tag}-vms"
        self.size = 0
        self.bridges = 0
        _new_ns(self.host_ns)
        try:
            _new_ns(self.vm_ns)
        except Exception:
            self.close()
            raise

    @staticmethod
    def tap(i: int) -> str:
        return f"{TAP_PREFIX}{i}"

    @staticmethod
    def tap_index(name: str) -> int:
        """i of `tap(i)`."""
        return int(name[len(TAP_PREFIX) :])

    @staticmethod
    def peer(i: int) -> str:
        return f"eth{i}"

    @staticmethod
    def vni(i: int) -> int:
        return FIRST_VNI + i // PORTS_PER_BRIDGE

    @classmethod
    def bridge(cls, i: int) -> str:
        return f"brvx-{cls.vni(i)}"

    @staticmethod
    def mac(i: int) -> str:
        """The guest MAC of NIC i (the tap carries it with 0xfe first, as libvirt sets taps)."""
        return f"52:54:{(i >> 24) & 255:02x}:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}"

    def grow(self, n: int) -> None:
        """Add VM interfaces until there are `n`."""
        new = range(self.size, n)
        bridges = range(self.bridges, (n + PORTS_PER_BRIDGE - 1) // PORTS_PER_BRIDGE)
        _batch(
            self.host_ns,
            [
                line
                for b in bridges
                for line in (
                    f"link add brvx-{FIRST_VNI + b} address {BRIDGE_MAC} type bridge",
                    f"link set brvx-{FIRST_VNI + b} up",
                )
            ],
        )
        self.bridges = max(self.bridges, bridges.stop)
        make_taps(self.host_ns, self.vm_ns, list(new))
        self.size = max(self.size, n)

    def exec_args(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.host_ns, *cmd]

    def close(self) -> None:
        for ns in (self.vm_ns, self.host_ns):
            for pid in sh("ip", "netns", "pids", ns, check=False).split():
                subprocess.run(["kill", "-9", pid], check=False)
            sh("ip", "netns", "del", ns, check=False)

    def __enter__(self) -> VethHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def replace_taps(host_ns: str, vm_ns: str, indexes: list[int]) -> None:
    """Replace these taps, as VMs stopping and others starting in their place: each veth pair is
    deleted (its tap's last counters go out in RTM_DELLINK) and made again under the same names
    and MACs, so the new tap has a new ifindex and counts from zero."""
    delete_taps(host_ns, indexes)
    make_taps(host_ns, vm_ns, indexes)


def delete_taps(host_ns: str, indexes: list[int]) -> None:
    """Delete these veth pairs (a tap already missing is passed over)."""
    try:
        _batch(host_ns, [f"link del {VethHost.tap(i)}" for i in indexes], force=True)
    except RuntimeError:
        pass


def make_taps(host_ns: str, vm_ns: str, indexes: list[int]) -> None:
    """Make these veth pairs (again) under their names and MACs, each tap on its bridge."""
    _batch(
        host_ns,
        [f"link add {VethHost.tap(i)} type veth peer name {VethHost.peer(i)} netns {vm_ns}" for i in indexes],
    )
    _batch(
        host_ns,
        [
            f"link set {VethHost.tap(i)} address fe{VethHost.mac(i)[2:]} master {VethHost.bridge(i)} up"
            for i in indexes
        ],
    )
    _batch(vm_ns, [f"link set {VethHost.peer(i)} address {VethHost.mac(i)} up" for i in indexes])


def netns_path(name: str) -> Path:
    return Path("/run/netns") / name
