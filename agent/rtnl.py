"""One rtnetlink link message (RTM_NEWLINK / RTM_DELLINK) decoded from its bytes: the few
attributes the topology needs, nothing else.

Why not pyroute2's ``ifinfmsg`` here: importing pyroute2 costs the agent about 20 MB of resident
memory (its package imports every netlink family), a fifth of its budget, for a dozen fixed
offsets. Layouts are the kernel's uapi (linux/rtnetlink.h, linux/if_link.h); the unit tests
check this decoder against pyroute2's on recorded messages.
"""

from __future__ import annotations

import struct
from typing import Any

NLMSG_HDRLEN = 16
IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
NLA_HDR = struct.Struct("=HH")  # length (header included), type
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER

IFLA_STATS = 7  # struct rtnl_link_stats: u32 counters
IFLA_IFNAME = 3
IFLA_LINK = 5
IFLA_MASTER = 10
IFLA_LINKINFO = 18
IFLA_STATS64 = 23  # struct rtnl_link_stats64: u64 counters
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
IFLA_VLAN_ID = 1  # u16, in IFLA_INFO_DATA of kind "vlan"
IFLA_VXLAN_ID = 1  # u32, in IFLA_INFO_DATA of kind "vxlan"
# Netlink is in the host's byte order ("=": native order, standard sizes).
U16 = struct.Struct("=H")
U32 = struct.Struct("=I")
# rx_packets, tx_packets, rx_bytes, tx_bytes: the first four fields of both stats structs
STATS64 = struct.Struct("=QQQQ")
STATS32 = struct.Struct("=IIII")


class LinkMessageError(ValueError):
    """A link message shorter than its headers say."""


def attributes(data: bytes, start: int, end: int) -> dict[int, bytes]:
    """type -> payload of the netlink attributes in data[start:end] (the first of a type wins)."""
    out: dict[int, bytes] = {}
    offset = start
    while offset + NLA_HDR.size <= end:
        length, kind = NLA_HDR.unpack_from(data, offset)
        if length < NLA_HDR.size or offset + length > end:
            raise LinkMessageError(f"attribute of length {length} at offset {offset} overruns the message")
        out.setdefault(kind & NLA_TYPE_MASK, data[offset + NLA_HDR.size : offset + length])
        offset += (length + 3) & ~3
    return out


def _string(payload: bytes | None) -> str | None:
    return payload.split(b"\0", 1)[0].decode("utf-8", "replace") if payload is not None else None


def _u32(payload: bytes | None) -> int | None:
    return U32.unpack_from(payload)[0] if payload is not None and len(payload) >= U32.size else None


class LinkMessage:
    """A decoded link message, read like pyroute2's ``ifinfmsg``: ``msg["family"]``,
    ``msg["index"]``, ``msg.get_attr("IFLA_IFNAME")`` and the nested ``IFLA_LINKINFO`` /
    ``IFLA_INFO_DATA`` (so :func:`kvmeter.agent.topology.parse_link_message` takes either)."""

    def __init__(self, header: dict[str, int], attrs: dict[str, Any]) -> None:
        self._header = header
        self._attrs = attrs

    def __getitem__(self, name: str) -> int:
        return self._header[name]

    def get_attr(self, name: str) -> Any:
        return self._attrs.get(name)


def decode_link_message(data: bytes) -> LinkMessage:
    """One whole netlink message (nlmsghdr included) of type RTM_NEWLINK or RTM_DELLINK."""
    end = min(len(data), U32.unpack_from(data)[0]) if len(data) >= U32.size else 0
    if end < NLMSG_HDRLEN + IFINFOMSG.size:
        raise LinkMessageError(f"link message of {end} bytes is shorter than its headers")
    family, _type, index, flags, _change = IFINFOMSG.unpack_from(data, NLMSG_HDRLEN)
    raw = attributes(data, NLMSG_HDRLEN + IFINFOMSG.size, end)
    attrs: dict[str, Any] = {}
    name = _string(raw.get(IFLA_IFNAME))
    if name is not None:
        attrs["IFLA_IFNAME"] = name
    for key, kind in (("IFLA_MASTER", IFLA_MASTER), ("IFLA_LINK", IFLA_LINK)):
        value = _u32(raw.get(kind))
        if value is not None:
            attrs[key] = value
    if IFLA_LINKINFO in raw:
        attrs["IFLA_LINKINFO"] = _link_info(raw[IFLA_LINKINFO])
    stats64 = raw.get(IFLA_STATS64)
    stats32 = raw.get(IFLA_STATS)
    if stats64 is not None and len(stats64) >= STATS64.size:
        attrs["IFLA_STATS64"] = _stats(STATS64.unpack_from(stats64))
    elif stats32 is not None and len(stats32) >= STATS32.size:
        attrs["IFLA_STATS"] = _stats(STATS32.unpack_from(stats32))
    return LinkMessage({"family": family, "index": index, "flags": flags}, attrs)


def _link_info(payload: bytes) -> LinkMessage:
    info = attributes(payload, 0, len(payload))
    attrs: dict[str, Any] = {}
    kind = _string(info.get(IFLA_INFO_KIND))
    if kind is not None:
        attrs["IFLA_INFO_KIND"] = kind
    data = info.get(IFLA_INFO_DATA)
    if data is not None and kind in ("vlan", "vxlan"):
        inner = attributes(data, 0, len(data))
        if kind == "vlan" and IFLA_VLAN_ID in inner and len(inner[IFLA_VLAN_ID]) >= 2:
            attrs["IFLA_INFO_DATA"] = LinkMessage(
                {}, {"IFLA_VLAN_ID": U16.unpack_from(inner[IFLA_VLAN_ID])[0]}
            )
        elif kind == "vxlan" and IFLA_VXLAN_ID in inner:
            attrs["IFLA_INFO_DATA"] = LinkMessage({}, {"IFLA_VXLAN_ID": _u32(inner[IFLA_VXLAN_ID])})
    return LinkMessage({}, attrs)


def _stats(values: tuple[int, ...]) -> dict[str, int]:
    rx_packets, tx_packets, rx_bytes, tx_bytes = values
    return {"rx_packets": rx_packets, "tx_packets": tx_packets, "rx_bytes": rx_bytes, "tx_bytes": tx_bytes}
