"""Move bytes on every VM interface between polls, so each poll sees every counter change.

Raw Ethernet frames (a local-experimental EtherType) through AF_PACKET sockets: from the host end
of each veth (the VM receives: host tx) and from the VM end to the bridge's own MAC (the VM sends:
host rx; addressed to the bridge, so the bridge delivers it locally instead of flooding it to
thousands of ports). One frame each way per interface per round.
"""

from __future__ import annotations

import ctypes
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CLONE_NEWNET = 0x40000000
ETHERTYPE = b"\x88\xb5"  # IEEE 802 local experimental: no protocol handler takes it
PAYLOAD = bytes(46)


@contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the block in network namespace `name` (single-threaded callers only)."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/self/ns/net", "rb") as home, open(Path("/run/netns") / name, "rb") as target:
        if libc.setns(target.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name}")
        try:
            yield
        finally:
            if libc.setns(home.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back home")


def _mac_bytes(mac: str) -> bytes:
    return bytes(int(part, 16) for part in mac.split(":"))


class Pusher:
    """Pushes one frame each way on `taps[i]` / `peers[i]`; call from the host namespace."""

    def __init__(self, vm_ns: str, taps: list[str], peers: list[str], bridge_mac: str) -> None:
        self.taps = taps
        self.peers = peers
        self.host_sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        with in_netns(vm_ns):
            self.vm_sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        src = b"\x02\x00\x00\x00\x00\x01"
        self.to_vm = b"\x02\x00\x00\x00\x00\x02" + src + ETHERTYPE + PAYLOAD
        self.to_host = _mac_bytes(bridge_mac) + src + ETHERTYPE + PAYLOAD

    def push(self) -> None:
        try:
            for tap in self.taps:
                self.host_sock.sendto(self.to_vm, (tap, 0))
            for peer in self.peers:
                self.vm_sock.sendto(self.to_host, (peer, 0))
        except OSError:  # a tap being replaced (bench.vethns.replace_taps): the next round pushes
            self._push_each()

    def _push_each(self) -> None:
        for sock, frame, names in (
            (self.host_sock, self.to_vm, self.taps),
            (self.vm_sock, self.to_host, self.peers),
        ):
            for name in names:
                try:
                    sock.sendto(frame, (name, 0))
                except OSError:
                    continue

    def close(self) -> None:
        self.host_sock.close()
        self.vm_sock.close()


def ifindexes() -> dict[str, int]:
    """name -> ifindex of this namespace's links (sysfs; the agent's topology learns the same)."""
    out = {}
    for entry in os.scandir("/sys/class/net"):
        out[entry.name] = int(Path(entry.path, "ifindex").read_text())
    return out


def main(argv: list[str] | None = None) -> int:
    """Push on taps tap0..tap{n-1} every `--every` seconds until killed (run in the host ns)."""
    import argparse
    import time

    from bench.vethns import BRIDGE_MAC, VethHost

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--vm-ns", required=True)
    ap.add_argument("--every", type=float, default=0.5)
    args = ap.parse_args(argv)
    pusher = Pusher(
        args.vm_ns,
        [VethHost.tap(i) for i in range(args.n)],
        [VethHost.peer(i) for i in range(args.n)],
        BRIDGE_MAC,
    )
    while True:
        pusher.push()
        time.sleep(args.every)


if __name__ == "__main__":
    raise SystemExit(main())
