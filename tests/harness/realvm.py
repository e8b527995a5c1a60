"""Real KVM hosts for tests: a simulated host's namespace with a real libvirtd and QEMU guests.

`RealHost` wraps one lab host (its bridges cloudbr0, cloud0, brvx-5001), a `Libvirtd` running
inside it and the guest image; `LinkWatch` records every link message of that namespace as the
kernel sends it (the counters a tap's RTM_DELLINK carries are the tap's final counters); the
guest's own `/proc/net/dev` lines come from its serial log.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvmeter.pipeline.sim.simnet import SENDER, Host, read_counters
from kvmeter.pipeline.sim.tapwatch import LinkWatch, TapRecord
from kvmeter.pipeline.sim.vmguest import GuestImage, guest_prints
from kvmeter.pipeline.sim.vmhost import Guest, GuestNic, Libvirtd, poweroff_command

__all__ = ["Guest", "GuestNic", "LinkWatch", "RealHost", "TapRecord", "wait_until"]

GUEST_PEER = "10.1.1.254"  # the host's own address on the guest bridge brvx-5001


def wait_until(check: Callable[[], object], timeout: float, what: str, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for: {what}")
        time.sleep(every)


@dataclass(frozen=True)
class Tap:
    ifname: str
    ifindex: int
    mac: str  # the guest's MAC
    bridge: str


class RealHost:
    """One simulated KVM host with a real libvirtd and QEMU guests."""

    def __init__(self, host: Host, libvirtd: Libvirtd, image: GuestImage, workdir: Path):
        self.host = host
        self.libvirtd = libvirtd
        self.image = image
        self.workdir = workdir
        self.guests: dict[str, Guest] = {}

    @property
    def ns(self) -> str:
        return self.host.ns

    def virsh(self, *args: str, check: bool = True) -> str:
        return self.libvirtd.virsh(*args, check=check)

    def serial_log(self, name: str) -> Path:
        return self.workdir / f"{name}.serial.log"

    def define(self, guest: Guest) -> None:
        path = self.workdir / f"{guest.name}.xml"
        log = self.serial_log(guest.name)
        log.unlink(missing_ok=True)
        path.write_text(guest.xml(self.image.kernel, self.image.initrd, log))
        self.virsh("define", str(path))
        self.guests[guest.name] = guest

    def start(self, name: str) -> list[Tap]:
        """Start a defined guest; its taps (one per NIC, in order) once libvirt has made them."""
        self.serial_log(name).unlink(missing_ok=True)
        self.virsh("start", name)
        return self.taps(name)

    def taps(self, name: str) -> list[Tap]:
        out = []
        for line in self.virsh("domiflist", name).splitlines():
            ifname, _kind, bridge, _model, mac = line.split()
            ifindex = int(self.host.run("cat", f"/sys/class/net/{ifname}/ifindex"))
            out.append(Tap(ifname, ifindex, mac, bridge))
        return out

    def destroy(self, name: str) -> None:
        self.virsh("destroy", name)

    def poweroff(self, name: str) -> None:
        """Ask the guest to power itself off (a TCP connection to its port 7)."""
        self.host.run(*poweroff_command(self.guests[name].nics[0].ip))

    def state(self, name: str) -> str:
        return self.virsh("domstate", name).strip()

    def wait_state(self, name: str, state: str, timeout: float = 30.0) -> None:
        wait_until(lambda: self.state(name) == state, timeout, f"{name} {state}")

    def guest_lines(self, name: str, label: str) -> list[dict[str, dict[str, int]]]:
        """The guest's own counter lines with ``label`` (up, tick, final), oldest first:
        one {ifname: {rx_bytes, tx_bytes}} per print."""
        try:
            text = self.serial_log(name).read_text(errors="replace")
        except FileNotFoundError:
            return []
        return guest_prints(text, label)

    def wait_up(self, name: str, timeout: float = 60.0) -> None:
        """Until the guest's NICs are up (it printed its first counters)."""
        wait_until(lambda: self.guest_lines(name, "up"), timeout, f"{name} booted")

    def tap_counters(self, ifname: str) -> dict[str, int]:
        return read_counters(self.ns, ifname)

    def send_udp(self, src: str, dst: str, nbytes: int, size: int = 1200) -> None:
        """UDP from the host's address ``src`` to a guest (received: the guest answers nothing
        but the occasional ICMP port unreachable)."""
        self.host.run(sys.executable, str(SENDER), src, dst, str(nbytes), str(size))

    def remove_all(self) -> None:
        for name in list(self.guests):
            self.virsh("destroy", name, check=False)
            self.virsh("undefine", name, check=False)
        self.guests.clear()
