"""Simulated KVM hosts in network namespaces, with real traffic and real kernel counters.

Layout of one `Lab` (all names carry a short random tag so parallel runs never collide):

    root ns --veth-- core ns: bridge mgmt0 (10.77.<n>.1/24; a broker may listen here)
                       |  per host: veth "management link", host side `mgmt` 10.77.<n>.<10+i>
    host ns <name>: bridges cloudbr0 (public), cloud0 (control), brvx-<vni> over vxlan<vni> (guest)
       VM NIC: veth pair, host end `vnetN` on a bridge (MAC = guest MAC with 0xfe first, as
       libvirt sets taps), VM end `ethK` in the VM's own namespace with the guest MAC and an IP.

Every address lives in a namespace the lab created; nothing leaves the machine. IPv6 is off in
every namespace so that no unsolicited packets (router solicitations, ND) move bytes behind a
test's back: the only traffic is what the test sends, plus the ARP it causes. Bridges run without
multicast snooping for the same reason (they would send IGMP reports out of every port).

One difference from a real tap: a veth's RTM_DELLINK carries no receive counter (a veth reads it
from its peer, which is already unlinked), so the VM's *transmit* tail since the agent's last poll
is not in the delete message as it is for a tap. Scenarios that delete a VM's veth let the agent
poll once after the VM's last transmission; the VM's *receive* tail (the host end's transmit) is
exact in the delete message and proves the no-tail-loss path.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import secrets
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvmeter.pipeline.sim.simlibvirt import Domain, Nic, tap_mac, write_node_xml

COUNTERS = ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets")
SENDER = Path(__file__).with_name("udpsend.py")
SINK = Path(__file__).with_name("udpsink.py")


def sh(*cmd: str, ns: str | None = None, check: bool = True) -> str:
    full = ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)
    result = subprocess.run(full, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(full)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def ip(*args: str, ns: str | None = None) -> None:
    sh("ip", *args, ns=ns)


def _new_ns(name: str) -> None:
    ip("netns", "add", name)
    ip("link", "set", "lo", "up", ns=name)
    for key in ("all", "default"):
        sh("sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1", ns=name)


def calm_neighbours(ns: str) -> None:
    """No ARP re-validation of a neighbour seconds after traffic: such a probe could land between
    an agent's last poll and a reading of the VM-side counters. Applies to the links there now."""
    script = (
        "for d in /proc/sys/net/ipv4/neigh/*; do echo 600000 > $d/base_reachable_time_ms;"
        " echo 600 > $d/delay_first_probe_time; done"
    )
    sh("sh", "-c", script, ns=ns)


def _kill_ns(name: str) -> None:
    pids = sh("ip", "netns", "pids", name, check=False).split()
    for pid in pids:
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass
    sh("ip", "netns", "del", name, check=False)


def read_counters(ns: str, ifname: str) -> dict[str, int]:
    out = sh("cat", *(f"/sys/class/net/{ifname}/statistics/{c}" for c in COUNTERS), ns=ns)
    return dict(zip(COUNTERS, (int(v) for v in out.split()), strict=True))


@dataclass
class VmNic:
    """One VM NIC: host end `tap` on `bridge`, VM end `ifname` in `vm.ns`."""

    vm: Vm
    tap: str
    ifname: str
    bridge: str
    mac: str
    address: str  # CIDR on the VM end, e.g. 198.51.100.10/24
    # VM-side counters of earlier incarnations (the veth is recreated on reboot/migration).
    past: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))

    @property
    def ip(self) -> str:
        return self.address.split("/")[0]

    def counters(self) -> dict[str, int]:
        """The VM-side kernel counters of the current incarnation."""
        return read_counters(self.vm.ns, self.ifname)

    def total(self) -> dict[str, int]:
        """VM-side counters summed over every incarnation of this NIC."""
        now = self.counters() if self.vm.present else dict.fromkeys(COUNTERS, 0)
        return {k: self.past[k] + now[k] for k in COUNTERS}

    def libvirt_nic(self) -> Nic:
        return Nic(mac=self.mac, bridge=self.bridge, dev=self.tap)


@dataclass
class Vm:
    host: Host
    name: str
    uuid: str
    ns: str
    nics: list[VmNic] = field(default_factory=list)
    present: bool = True

    def send(self, dst_ip: str, nbytes: int, *, nic: int = 0, payload: int = 1000) -> None:
        """Send UDP datagrams carrying `nbytes` of payload in total from this VM to `dst_ip`."""
        src = self.nics[nic].ip
        sh(sys.executable, str(SENDER), src, dst_ip, str(nbytes), str(payload), ns=self.ns)

    def announce(self) -> None:
        """Broadcast one tiny datagram per NIC so bridges learn where the VM is now (like QEMU's
        announce-self after a migration)."""
        for k, nic in enumerate(self.nics):
            broadcast = str(ipaddress.ip_interface(nic.address).network.broadcast_address)
            self.send(broadcast, 1, nic=k)

    def domain(self, owner: dict[str, str] | None = None) -> Domain:
        return Domain(self.name, self.uuid, tuple(n.libvirt_nic() for n in self.nics), owner=owner or {})


class Host:
    """A simulated KVM host: a namespace with CloudStack's bridges and a management link."""

    def __init__(self, lab: Lab, name: str, index: int, vnis: Sequence[int]):
        self.lab = lab
        self.name = name
        self.ns = f"{lab.tag}-{name}"
        self.mgmt_ip = f"{lab.net}.{10 + index}"
        self.core_end = f"{lab.tag}m{index}"
        self.vms: dict[str, Vm] = {}
        self._tap_numbers = itertools.count()
        _new_ns(self.ns)
        lab.namespaces.append(self.ns)
        # management link to the core namespace
        ip(
            "link",
            "add",
            "mgmt",
            "netns",
            self.ns,
            "type",
            "veth",
            "peer",
            "name",
            self.core_end,
            "netns",
            lab.core,
        )
        ip("link", "set", self.core_end, "master", "mgmt0", "up", ns=lab.core)
        ip("addr", "add", f"{self.mgmt_ip}/24", "dev", "mgmt", ns=self.ns)
        ip("link", "set", "mgmt", "up", ns=self.ns)
        for bridge in ("cloudbr0", "cloud0"):
            self._bridge(bridge)
        ip("addr", "add", "198.51.100.1/24", "dev", "cloudbr0", ns=self.ns)  # the public gateway
        ip("addr", "add", "169.254.0.1/16", "dev", "cloud0", ns=self.ns)  # link-local control
        for vni in vnis:
            self.add_vxlan(vni)

    def _bridge(self, name: str) -> None:
        # no IGMP reports out of every port at random times: only what a test sends moves bytes
        ip("link", "add", name, "type", "bridge", "mcast_snooping", "0", ns=self.ns)
        ip("link", "set", name, "up", ns=self.ns)

    def add_vxlan(self, vni: int) -> None:
        """Guest network `brvx-<vni>` over a real `vxlan<vni>` on the management link."""
        self._bridge(f"brvx-{vni}")
        ip("link", "add", f"vxlan{vni}", "type", "vxlan", "id", str(vni), "dstport", "4789",
           "local", self.mgmt_ip, "dev", "mgmt", ns=self.ns)  # fmt: skip
        ip("link", "set", f"vxlan{vni}", "master", f"brvx-{vni}", "up", ns=self.ns)

    def join_vxlan(self, vni: int, peers: Sequence[Host]) -> None:
        """Flood this host's vxlan<vni> to the peers' management addresses (head-end replication)."""
        for peer in peers:
            ip("link", "set", f"vxlan{vni}", "up", ns=self.ns)
            sh("bridge", "fdb", "append", "00:00:00:00:00:00", "dev", f"vxlan{vni}", "dst", peer.mgmt_ip,
               ns=self.ns)  # fmt: skip

    def add_vm(self, name: str, uuid: str, nics: Sequence[tuple[str, str, str]]) -> Vm:
        """Add a VM whose NICs are (bridge, guest MAC, address/prefix), each with a fresh vnetN tap."""
        vm = Vm(self, name, uuid, ns=f"{self.lab.tag}-{name}")
        _new_ns(vm.ns)
        self.lab.namespaces.append(vm.ns)
        for k, (bridge, mac, address) in enumerate(nics):
            nic = VmNic(vm, f"vnet{next(self._tap_numbers)}", f"eth{k}", bridge, mac.lower(), address)
            vm.nics.append(nic)
            self._plug(nic)
        # A UDP sink on the traffic port: datagrams to the VM draw no ICMP "port unreachable"
        # back, so a VM that stopped sending sends nothing at all. (Ended with the namespace.)
        self.lab.processes.append(subprocess.Popen(["ip", "netns", "exec", vm.ns, sys.executable, str(SINK)]))
        self.vms[name] = vm
        return vm

    def _plug(self, nic: VmNic) -> None:
        vm = nic.vm
        ip(
            "link",
            "add",
            nic.tap,
            "netns",
            self.ns,
            "type",
            "veth",
            "peer",
            "name",
            nic.ifname,
            "netns",
            vm.ns,
        )
        ip("link", "set", nic.tap, "address", tap_mac(nic.mac), "master", nic.bridge, "up", ns=self.ns)
        ip("link", "set", nic.ifname, "address", nic.mac, ns=vm.ns)
        ip("addr", "add", nic.address, "dev", nic.ifname, ns=vm.ns)
        ip("link", "set", nic.ifname, "up", ns=vm.ns)
        calm_neighbours(vm.ns)
        calm_neighbours(self.ns)

    def unplug_all(self, vm: Vm) -> None:
        """Stop the VM: record each NIC's final VM-side counters, then delete its veths."""
        for nic in vm.nics:
            final = nic.counters()
            for k in COUNTERS:
                nic.past[k] += final[k]
            ip("link", "del", nic.tap, ns=self.ns)
        vm.present = False

    def plug_all(self, vm: Vm) -> None:
        """Start a stopped VM again: its taps come back (same names, new ifindex)."""
        for nic in vm.nics:
            self._plug(nic)
        vm.present = True

    def reboot(self, vm: Vm) -> None:
        """A VM reboot as the host sees it: taps deleted and recreated (same names, new ifindex)."""
        self.unplug_all(vm)
        self.plug_all(vm)

    def migrate(self, vm: Vm, target: Host) -> Vm:
        """Move `vm` to `target`: its taps vanish here and appear there (the VM namespace moves along)."""
        self.unplug_all(vm)
        del self.vms[vm.name]
        vm.host = target
        for nic in vm.nics:
            nic.tap = f"vnet{next(target._tap_numbers)}"
            target._plug(nic)
        vm.present = True
        target.vms[vm.name] = vm
        vm.announce()
        return vm

    def mgmt_down(self) -> None:
        ip("link", "set", self.core_end, "down", ns=self.lab.core)

    def mgmt_up(self) -> None:
        ip("link", "set", self.core_end, "up", ns=self.lab.core)

    def exec_args(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *cmd]

    def popen(self, *cmd: str, **kwargs: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.exec_args(*cmd), **kwargs)  # type: ignore[call-overload]

    def run(self, *cmd: str) -> str:
        return sh(*cmd, ns=self.ns)

    def tap_counters(self, tap: str) -> dict[str, int]:
        return read_counters(self.ns, tap)

    def write_libvirt_xml(self, path: Path, owners: dict[str, dict[str, str]] | None = None) -> str:
        """A test-driver node file describing this host's VMs; returns its URI."""
        owners = owners or {}
        return write_node_xml(path, [vm.domain(owners.get(vm.name)) for vm in self.vms.values()])


class Lab:
    """Namespaces of one test: a core (management) network and any number of hosts."""

    def __init__(self) -> None:
        if os.geteuid() != 0:
            raise RuntimeError("building network namespaces needs root")
        self.tag = "kvt" + secrets.token_hex(2)
        # Each lab its own management /24, so that labs of tests running side by side never meet.
        self.net = f"10.77.{int(self.tag[3:], 16) % 250 + 1}"
        self.core = f"{self.tag}-core"
        self.namespaces: list[str] = [self.core]
        self.processes: list[subprocess.Popen[bytes]] = []  # helpers running inside the lab
        self.hosts: list[Host] = []
        _new_ns(self.core)
        ip("link", "add", "mgmt0", "type", "bridge", "mcast_snooping", "0", ns=self.core)
        ip("addr", "add", f"{self.net}.1/24", "dev", "mgmt0", ns=self.core)
        ip("link", "set", "mgmt0", "up", ns=self.core)
        # the root namespace reaches the core (and a broker in it) over its own veth
        self.root_end = f"{self.tag}r"
        ip("link", "add", self.root_end, "type", "veth", "peer", "name", "uplink", "netns", self.core)
        ip("link", "set", "uplink", "master", "mgmt0", "up", ns=self.core)
        ip("addr", "add", f"{self.net}.254/24", "dev", self.root_end)
        ip("link", "set", self.root_end, "up")

    @property
    def core_ip(self) -> str:
        return f"{self.net}.1"

    def add_host(self, name: str, vnis: Sequence[int] = (5001,)) -> Host:
        host = Host(self, name, len(self.hosts) + 1, vnis)
        self.hosts.append(host)
        return host

    @property
    def root_ip(self) -> str:
        """The root namespace's address on the management network (hosts reach it directly)."""
        return f"{self.net}.254"

    def in_core(self) -> list[str]:
        return ["ip", "netns", "exec", self.core]

    def close(self) -> None:
        for proc in self.processes:
            proc.kill()
            proc.wait(10)
        for ns in reversed(self.namespaces):
            _kill_ns(ns)
        sh("ip", "link", "del", self.root_end, check=False)
