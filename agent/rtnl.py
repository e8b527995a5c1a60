"""One rtnetlink link message (RTM_NEWLINK / RTM_DELLINK) decoded from its bytes: the few
attributes the topology needs, nothing else.

Why not pyroute2's ``ifinfmsg`` here: importing pyroute2 costs the agent about 20 MB of resident
memory (its package imports every netlink family), a fifth of its budget, for a dozen fixed
offsets. Layouts are the kernel's uapi (linux/rtnetlink.h, linux/if_link.h); the unit tests
check this decoder against pyroute2's on recorded messages.
"""

from __future__ import annotations

import struct
from collections.abc import Container
from typing import Any, NamedTuple

NLMSG_HDRLEN = 16
IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
NLA_HDR = struct.Struct("=HH")  # length (header included), type
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER

IFLA_ADDRESS = 1  # the link-layer address (a tap's MAC)
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
_LINK_ATTRIBUTES = frozenset(
    {IFLA_ADDRESS, IFLA_IFNAME, IFLA_LINK, IFLA_MASTER, IFLA_LINKINFO, IFLA_STATS64, IFLA_STATS}
)
_INFO_ATTRIBUTES = frozenset({IFLA_INFO_KIND, IFLA_INFO_DATA})
_ID_ATTRIBUTES = frozenset({IFLA_VLAN_ID, IFLA_VXLAN_ID})  # both 1: the one ID attribute
# Netlink is in the host's byte order ("=": native order, standard sizes).
U16 = struct.Struct("=H")
U32 = struct.Struct("=I")
# rx_packets, tx_packets, rx_bytes, tx_bytes: the first four fields of both stats structs
STATS64 = struct.Struct("=QQQQ")
STATS32 = struct.Struct("=IIII")


class LinkMessageError(ValueError):
    """A link message shorter than its headers say."""


def attributes(data: bytes, start: int, end: int, wanted: Container[int]) -> dict[int, bytes]:
    """type -> payload of the `wanted` netlink attributes in data[start:end] (the first of a
    type wins). Every attribute's header is checked; only the wanted ones' payloads are cut
    out (a link message has some forty attributes: a VM storm sends thousands of messages)."""
    out: dict[int, bytes] = {}
    offset = start
    header, size = NLA_HDR.unpack_from, NLA_HDR.size
    while offset + size <= end:
        length, kind = header(data, offset)
        stop = offset + length
        if length < size or stop > end:
            raise LinkMessageError(f"attribute of length {length} at offset {offset} overruns the message")
        kind &= NLA_TYPE_MASK
        if kind in wanted:
            out.setdefault(kind, data[offset + size : stop])
        offset = (stop + 3) & ~3
    return out


def master_of(data: bytes) -> int | None:
    """A whole link message's IFLA_MASTER (None: none), its attributes walked only up to it
    (the kernel puts it among the first twenty of some forty)."""
    end = min(len(data), U32.unpack_from(data)[0]) if len(data) >= U32.size else 0
    offset = NLMSG_HDRLEN + IFINFOMSG.size
    if end < offset:
        raise LinkMessageError(f"link message of {end} bytes is shorter than its headers")
    header, size = NLA_HDR.unpack_from, NLA_HDR.size
    while offset + size <= end:
        length, kind = header(data, offset)
        if length < size or offset + length > end:
            raise LinkMessageError(f"attribute of length {length} at offset {offset} overruns the message")
        if kind & NLA_TYPE_MASK == IFLA_MASTER:
            return _u32(data[offset + size : offset + length]) or None
        offset = (offset + length + 3) & ~3
    return None


def _string(payload: bytes | None) -> str | None:
    return payload.split(b"\0", 1)[0].decode("utf-8", "replace") if payload is not None else None


def _u32(payload: bytes | None) -> int | None:
    return U32.unpack_from(payload)[0] if payload is not None and len(payload) >= U32.size else None


class LinkMessage:
    """A decoded link message, read like pyroute2's ``ifinfmsg``: ``msg["family"]``,
    ``msg["index"]``, ``msg.get_attr("IFLA_IFNAME")`` and the nested ``IFLA_LINKINFO`` /
    ``IFLA_INFO_DATA`` (so :func:`kvmeter.agent.linkevents.parse_link_message` takes either)."""

    def __init__(self, header: dict[str, int], attrs: dict[str, Any]) -> None:
        self._header = header
        self._attrs = attrs

    def __getitem__(self, name: str) -> int:
        return self._header[name]

    def get_attr(self, name: str) -> Any:
        return self._attrs.get(name)


class LinkFields(NamedTuple):
    """What the topology takes of one link message (None: the attribute is absent)."""

    family: int
    ifindex: int
    flags: int
    name: str | None
    master: int | None
    link: int | None
    kind: str | None  # IFLA_INFO_KIND
    vlan_id: int | None  # of a "vlan"
    vxlan_vni: int | None  # of a "vxlan"
    stats: tuple[int, int, int, int] | None  # rx_bytes, rx_packets, tx_bytes, tx_packets
    stats64: bool  # the stats are IFLA_STATS64's (else IFLA_STATS's)
    address: bytes | None = None  # IFLA_ADDRESS


def link_fields(data: bytes) -> LinkFields:
    """One whole netlink message (nlmsghdr included) of type RTM_NEWLINK or RTM_DELLINK."""
    end = min(len(data), U32.unpack_from(data)[0]) if len(data) >= U32.size else 0
    if end < NLMSG_HDRLEN + IFINFOMSG.size:
        raise LinkMessageError(f"link message of {end} bytes is shorter than its headers")
    family, _type, index, flags, _change = IFINFOMSG.unpack_from(data, NLMSG_HDRLEN)
    raw = attributes(data, NLMSG_HDRLEN + IFINFOMSG.size, end, _LINK_ATTRIBUTES)
    kind = vlan_id = vxlan_vni = None
    if IFLA_LINKINFO in raw:
        info = attributes(raw[IFLA_LINKINFO], 0, len(raw[IFLA_LINKINFO]), _INFO_ATTRIBUTES)
        kind = _string(info.get(IFLA_INFO_KIND))
        data_attr = info.get(IFLA_INFO_DATA)
        if data_attr is not None and kind in ("vlan", "vxlan"):
            inner = attributes(data_attr, 0, len(data_attr), _ID_ATTRIBUTES).get(IFLA_VLAN_ID)
            if kind == "vlan" and inner is not None and len(inner) >= U16.size:
                vlan_id = U16.unpack_from(inner)[0]
            elif kind == "vxlan":
                vxlan_vni = _u32(inner)
    stats64, stats32 = raw.get(IFLA_STATS64), raw.get(IFLA_STATS)
    wide = stats64 is not None and len(stats64) >= STATS64.size
    stats = None
    if wide or (stats32 is not None and len(stats32) >= STATS32.size):
        layout, payload = (STATS64, stats64) if wide else (STATS32, stats32)
        rx_packets, tx_packets, rx_bytes, tx_bytes = layout.unpack_from(payload)  # type: ignore[arg-type]
        stats = (rx_bytes, rx_packets, tx_bytes, tx_packets)
    return LinkFields(
        family,
        index,
        flags,
        _string(raw.get(IFLA_IFNAME)),
        _u32(raw.get(IFLA_MASTER)),
        _u32(raw.get(IFLA_LINK)),
        kind,
        vlan_id,
        vxlan_vni,
        stats,
        wide,
        raw.get(IFLA_ADDRESS),
    )


def mac_text(address: bytes) -> str:
    """A link-layer address as pyroute2 and sysfs give it: aa:bb:cc:dd:ee:ff."""
    return address.hex(":")


def decode_link_message(data: bytes) -> LinkMessage:
    """link_fields, read like pyroute2's ``ifinfmsg`` (for what takes either)."""
    f = link_fields(data)
    attrs: dict[str, Any] = {}
    for key, value in (("IFLA_IFNAME", f.name), ("IFLA_MASTER", f.master), ("IFLA_LINK", f.link)):
        if value is not None:
            attrs[key] = value
    if f.address:
        attrs["IFLA_ADDRESS"] = mac_text(f.address)
    if f.kind is not None:
        info: dict[str, Any] = {"IFLA_INFO_KIND": f.kind}
        if f.vlan_id is not None:
            info["IFLA_INFO_DATA"] = LinkMessage({}, {"IFLA_VLAN_ID": f.vlan_id})
        elif f.kind == "vxlan" and f.vxlan_vni is not None:
            info["IFLA_INFO_DATA"] = LinkMessage({}, {"IFLA_VXLAN_ID": f.vxlan_vni})
        attrs["IFLA_LINKINFO"] = LinkMessage({}, info)
    if f.stats is not None:
        rx_bytes, rx_packets, tx_bytes, tx_packets = f.stats
        attrs["IFLA_STATS64" if f.stats64 else "IFLA_STATS"] = {
            "rx_packets": rx_packets,
            "tx_packets": tx_packets,
            "rx_bytes": rx_bytes,
            "tx_bytes": tx_bytes,
        }
    return LinkMessage({"family": f.family, "index": f.ifindex, "flags": f.flags}, attrs)
