"""Record the netlink link messages the topology unit tests replay (run as root, by hand).

    .venv/bin/python tests/unit/data/netlink/record_links.py

Builds a small CloudStack-like host in a throw-away network namespace (cloud0, cloudbr0,
brvx-1001 over a real vxlan1001, breth1-100, taps as veth pairs), then writes

* ``host_dump.hex``: the kernel's answer to an RTM_GETLINK dump;
* ``events.hex``: what an RTMGRP_LINK subscriber received while a tap was created, put on a
  bridge, carried a known number of frames and was deleted (its RTM_DELLINK carries the final
  IFLA_STATS64), including the AF_BRIDGE port messages the bridge sends.

This kernel has no 802.1Q module, so the VLAN device ``eth1.100`` (and a macvtap on it) are
*constructed* with :func:`link_message` in the kernel's layout (rtnl_fill_ifinfo: nlmsghdr,
ifinfomsg, IFLA_IFNAME, IFLA_LINK, IFLA_MASTER, IFLA_LINKINFO{KIND, DATA{IFLA_VLAN_ID,
IFLA_VLAN_PROTOCOL}}, IFLA_STATS64), without pyroute2's encoder, and appended to the dump.

Files: one message per line as hex; ``#`` lines are comments naming the message that follows.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
NS = f"kvmeter-rec-{os.getpid()}"

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_DUMP = 0x1, 0x2, 0x300
NLMSG_DONE = 3
IFLA_IFNAME, IFLA_MTU, IFLA_LINK, IFLA_MASTER, IFLA_LINKINFO, IFLA_STATS64 = 3, 4, 5, 10, 18, 23
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
IFLA_VLAN_ID, IFLA_VLAN_PROTOCOL = 1, 5
NLA_F_NESTED = 0x8000
FRAME = 100  # bytes per recorded test frame
FRAMES = 7


def rtattr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * ((4 - length % 4) % 4)


def stats64(rx_packets: int, tx_packets: int, rx_bytes: int, tx_bytes: int) -> bytes:
    fields = [rx_packets, tx_packets, rx_bytes, tx_bytes] + [0] * 19  # rtnl_link_stats64 head
    return struct.pack("=23Q", *fields)


def link_message(
    msg_type: int,
    ifindex: int,
    name: str,
    *,
    kind: str | None = None,
    info_data: bytes = b"",
    link: int | None = None,
    master: int | None = None,
    stats: tuple[int, int, int, int] = (0, 0, 0, 0),
    seq: int = 0,
) -> bytes:
    """An RTM_NEWLINK/RTM_DELLINK message as the kernel lays it out (subset of attributes)."""
    attrs = rtattr(IFLA_IFNAME, name.encode() + b"\0") + rtattr(IFLA_MTU, struct.pack("=I", 1500))
    if link is not None:
        attrs += rtattr(IFLA_LINK, struct.pack("=I", link))
    if master is not None:
        attrs += rtattr(IFLA_MASTER, struct.pack("=I", master))
    if kind is not None:
        info = rtattr(IFLA_INFO_KIND, kind.encode() + b"\0")
        if info_data:
            info += rtattr(IFLA_INFO_DATA | NLA_F_NESTED, info_data)
        attrs += rtattr(IFLA_LINKINFO | NLA_F_NESTED, info)
    attrs += rtattr(IFLA_STATS64, stats64(*stats))
    ifinfo = struct.pack("=BxHiII", 0, 1, ifindex, 0x1043, 0)  # AF_UNSPEC, ARPHRD_ETHER, UP|RUNNING
    body = ifinfo + attrs
    flags = NLM_F_MULTI if seq else 0
    return struct.pack("=IHHII", 16 + len(body), msg_type, flags, seq, 0) + body


def vlan_data(vlan_id: int) -> bytes:
    return rtattr(IFLA_VLAN_ID, struct.pack("=H", vlan_id)) + rtattr(
        IFLA_VLAN_PROTOCOL, struct.pack(">H", 0x8100)
    )


def split(data: bytes) -> list[bytes]:
    out, offset = [], 0
    while offset + 16 <= len(data):
        (length,) = struct.unpack_from("=I", data, offset)
        out.append(data[offset : offset + length])
        offset += (length + 3) & ~3
    return out


def describe(message: bytes) -> str:
    length, msg_type = struct.unpack_from("=IH", message)
    family, _, index = struct.unpack_from("=BxHi", message, 16)
    name = "?"
    offset = 32
    while offset + 4 <= length:
        alen, akind = struct.unpack_from("=HH", message, offset)
        if akind == IFLA_IFNAME:
            name = message[offset + 4 : offset + alen].rstrip(b"\0").decode()
        offset += (alen + 3) & ~3
    kind = {RTM_NEWLINK: "RTM_NEWLINK", RTM_DELLINK: "RTM_DELLINK"}.get(msg_type, str(msg_type))
    return f"{kind} family={family} index={index} {name}"


def write(path: Path, messages: list[bytes], notes: dict[int, str]) -> None:
    lines = [f"# recorded by record_links.py on Linux {os.uname().release}"]
    for number, message in enumerate(messages):
        lines.append(f"# {describe(message)}{notes.get(number, '')}")
        lines.append(message.hex())
    path.write_text("\n".join(lines) + "\n")


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


def ifindex(name: str) -> int:
    return int(Path(f"/sys/class/net/{name}/ifindex").read_text())


def dump() -> bytes:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
    request = struct.pack("=IHHII", 32, RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + bytes(16)
    sock.send(request)
    data = b""
    while True:
        chunk = sock.recv(1 << 16)
        done = any(struct.unpack_from("=IH", m)[1] == NLMSG_DONE for m in split(chunk))
        data += b"".join(
            m + b"\0" * ((4 - len(m) % 4) % 4) for m in split(chunk) if not m[4:6] == b"\x03\x00"
        )
        if done:
            break
    sock.close()
    return data


def send_frames(ifname: str, count: int) -> None:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sock.bind((ifname, 0))
    frame = b"\x02\x00\x00\x00\x00\x99" + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + bytes(FRAME - 14)
    for _ in range(count):
        sock.send(frame)
    sock.close()


def inside() -> None:
    for sysctl in ("all", "default"):
        Path(f"/proc/sys/net/ipv6/conf/{sysctl}/disable_ipv6").write_text("1")
    for bridge in ("cloud0", "cloudbr0", "brvx-1001", "breth1-100"):
        ip("link", "add", bridge, "type", "bridge")
        ip("link", "set", bridge, "up")
    ip("link", "add", "vxlan1001", "type", "vxlan", "id", "1001", "dstport", "4789", "local", "127.0.0.1")
    ip("link", "set", "vxlan1001", "master", "brvx-1001")
    ip("link", "add", "eth1", "type", "veth", "peer", "name", "eth1-peer")
    for tap, bridge in (
        ("vnet0", "brvx-1001"),
        ("vnet1", "cloudbr0"),
        ("vnet2", "cloud0"),
        ("vnet3", "breth1-100"),
    ):
        ip("link", "add", tap, "type", "veth", "peer", "name", f"{tap}-vm")
        ip("link", "set", tap, "master", bridge)
    dumped = split(dump())
    eth1, breth = ifindex("eth1"), ifindex("breth1-100")
    vlan = link_message(
        RTM_NEWLINK, 1000, "eth1.100", kind="vlan", info_data=vlan_data(100), link=eth1, master=breth, seq=1
    )
    macvtap = link_message(RTM_NEWLINK, 1001, "macvtap0", kind="macvtap", link=1000, seq=1)
    write(
        HERE / "host_dump.hex",
        [*dumped, vlan, macvtap],
        {len(dumped): " (constructed)", len(dumped) + 1: " (constructed)"},
    )

    events = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
    events.bind((0, 1))  # RTMGRP_LINK
    ip("link", "add", "vnet9", "type", "veth", "peer", "name", "vnet9-vm")
    ip("link", "set", "vnet9", "master", "cloudbr0")
    ip("link", "set", "vnet9", "up")
    ip("link", "set", "vnet9-vm", "up")
    time.sleep(0.2)
    send_frames("vnet9-vm", FRAMES)  # arrive on vnet9: rx
    time.sleep(0.2)
    ip("link", "del", "vnet9")
    received: list[bytes] = []
    while select.select([events], [], [], 0.5)[0]:
        received.extend(split(events.recv(1 << 16)))
    events.close()
    notes = {
        n: f" (after {FRAMES} frames of {FRAME} bytes into vnet9)"
        for n, m in enumerate(received)
        if m[4] == 17
    }
    write(HERE / "events.hex", received, notes)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--inside":
        inside()
        return
    ip("netns", "add", NS)
    try:
        subprocess.run(["ip", "netns", "exec", NS, sys.executable, __file__, "--inside"], check=True)
    finally:
        ip("netns", "del", NS)


if __name__ == "__main__":
    main()
