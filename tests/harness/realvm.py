"""Real KVM hosts for tests: a simulated host's namespace with a real libvirtd and QEMU guests.

`RealHost` wraps one lab host (its bridges cloudbr0, cloud0, brvx-5001), a `Libvirtd` running
inside it and the guest image; `LinkWatch` records every link message of that namespace as the
kernel sends it (the counters a tap's RTM_DELLINK carries are the tap's final counters); the
guest's own `/proc/net/dev` lines come from its serial log.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvmeter.pipeline.simnet import SENDER, Host, read_counters
from kvmeter.pipeline.vmguest import POWEROFF_PORT, SERIAL_TAG, GuestImage
from kvmeter.pipeline.vmhost import Guest, GuestNic, Libvirtd

__all__ = ["Guest", "GuestNic", "LinkWatch", "RealHost", "TapRecord", "wait_until"]

GUEST_PEER = "10.1.1.254"  # the host's own address on the guest bridge brvx-5001

# Run inside the host's namespace: every RTM_NEWLINK/RTM_DELLINK of a tap, as JSON lines.
_WATCH = r"""
import json, sys
from pyroute2 import IPRoute
with IPRoute() as ipr:
    ipr.bind()
    print(json.dumps({"ready": True}), flush=True)
    while True:
        for msg in ipr.get():
            event = msg.get("event")
            if event not in ("RTM_NEWLINK", "RTM_DELLINK") or msg["family"] == 7:
                continue  # AF_BRIDGE (7): a port joining or leaving its bridge, no counters
            name = msg.get_attr("IFLA_IFNAME") or ""
            if not name.startswith("vnet"):
                continue
            stats = msg.get_attr("IFLA_STATS64") or {}
            print(json.dumps({
                "event": event, "ifname": name, "ifindex": msg["index"],
                "mac": msg.get_attr("IFLA_ADDRESS"),
                "rx_bytes": stats.get("rx_bytes"), "tx_bytes": stats.get("tx_bytes"),
                "at": __import__("time").monotonic(),
            }), flush=True)
"""


@dataclass(frozen=True)
class TapRecord:
    """One link message of a tap, host side: rx = what the VM sent, tx = what it received."""

    event: str
    ifname: str
    ifindex: int
    mac: str
    rx_bytes: int | None
    tx_bytes: int | None
    at: float


class LinkWatch:
    """The tap link messages of namespace ``ns`` since start(), in order."""

    def __init__(self, ns: str):
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", _WATCH],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        if "ready" not in self.proc.stdout.readline():
            raise RuntimeError(f"the link watch in {ns} did not start")
        self.records: list[TapRecord] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, name="linkwatch", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.records.append(TapRecord(**json.loads(line)))

    def deleted(self) -> list[TapRecord]:
        with self._lock:
            return [r for r in self.records if r.event == "RTM_DELLINK"]

    def wait_deleted(self, ifindex: int, timeout: float = 30.0) -> TapRecord:
        found: list[TapRecord] = []

        def gone() -> bool:
            found[:] = [r for r in self.deleted() if r.ifindex == ifindex]
            return bool(found)

        wait_until(gone, timeout, f"tap ifindex {ifindex} deleted")
        return found[0]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self._thread.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


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
        address = self.guests[name].nics[0].ip
        script = f"import socket; socket.create_connection(({address!r}, {POWEROFF_PORT}), 10).close()"
        self.host.run(sys.executable, "-c", script)

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
        prints: list[dict[str, dict[str, int]]] = []
        current: dict[str, dict[str, int]] = {}
        last_eth = -1
        for line in text.split("\n")[:-1]:  # the last one may be half written
            parts = line.strip().split(None, 2)
            if len(parts) < 3 or parts[0] != SERIAL_TAG or parts[1] != label:
                continue
            ifname, numbers = parts[2].split(":", 1)
            fields = [int(v) for v in numbers.split()]
            k = int(ifname.strip()[3:])
            if k <= last_eth:  # the next print starts at eth0 again
                prints.append(current)
                current = {}
            current[ifname.strip()] = {"rx_bytes": fields[0], "tx_bytes": fields[8]}
            last_eth = k
        if current:
            prints.append(current)
        return prints

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
