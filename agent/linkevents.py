"""The netlink side of the topology: link messages decoded into records, the socket that
receives link events, and the dump of every link. The pure part first:
:func:`parse_link_message` turns one decoded link message (pyroute2's ``ifinfmsg`` or
:class:`kvmeter.agent.rtnl.LinkMessage`, read the same way) into a :class:`LinkRecord`, and
:func:`decode_link_datagrams` does that for the raw datagrams of one read of the event socket
(a link's ``RTM_NEWLINK`` only when no later one in the read supersedes it).

Why the event socket is a plain ``AF_NETLINK`` socket and not ``IPRoute.bind()``: ``get()``
blocks until the next message with no timeout in 0.7.2, and in 0.9.x an ENOBUFS poisons the
``IPRoute`` object for good; a plain socket + ``select`` stops promptly and survives overruns.
Events and dumps alike are decoded by :mod:`kvmeter.agent.rtnl` (same code path), which
spares the agent pyroute2's import (~20 MB resident); ``IPRoute`` still works as a dumper.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import struct
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from kvmeter.agent.linktable import RTM_DELLINK, RTM_NEWLINK, LinkRecord
from kvmeter.agent.rtnl import (
    LinkFields,
    LinkMessageError,
    decode_link_message,
    link_fields,
    mac_text,
    master_of,
)

log = logging.getLogger(__name__)

RTMGRP_LINK = 0x1
NETLINK_ROUTE = 0
AF_BRIDGE = 7


def parse_link_message(msg: Any) -> LinkRecord:
    """A decoded link message (from a dump or an event) -> :class:`LinkRecord`."""
    linkinfo = msg.get_attr("IFLA_LINKINFO")
    kind = linkinfo.get_attr("IFLA_INFO_KIND") if linkinfo is not None else None
    if kind is not None:
        kind = sys.intern(kind)  # one string per kind, not one per link ("veth", "tun", ...)
    data = linkinfo.get_attr("IFLA_INFO_DATA") if linkinfo is not None else None
    vlan_id = vxlan_vni = None
    if data is not None and kind == "vlan":
        vlan_id = data.get_attr("IFLA_VLAN_ID")
    elif data is not None and kind == "vxlan":
        vxlan_vni = data.get_attr("IFLA_VXLAN_ID")
    raw_stats = msg.get_attr("IFLA_STATS64") or msg.get_attr("IFLA_STATS")
    stats = None
    if raw_stats is not None:
        stats = (
            raw_stats["rx_bytes"],
            raw_stats["rx_packets"],
            raw_stats["tx_bytes"],
            raw_stats["tx_packets"],
        )
    return LinkRecord(
        ifindex=msg["index"],
        ifname=msg.get_attr("IFLA_IFNAME"),
        kind=kind,
        master=msg.get_attr("IFLA_MASTER") or None,
        link=msg.get_attr("IFLA_LINK") or None,
        vlan_id=vlan_id,
        vxlan_vni=vxlan_vni,
        stats=stats,
        address=msg.get_attr("IFLA_ADDRESS") or None,
    )


def _record(f: LinkFields) -> LinkRecord:
    """parse_link_message of a message decoded by link_fields (a link event's)."""
    return LinkRecord(
        ifindex=f.ifindex,
        ifname=f.name,  # type: ignore[arg-type]  # the caller skips nameless messages
        kind=sys.intern(f.kind) if f.kind is not None else None,
        master=f.master or None,
        link=f.link or None,
        vlan_id=f.vlan_id,
        vxlan_vni=f.vxlan_vni,
        stats=f.stats,
        address=mac_text(f.address) if f.address else None,
    )


# ifinfomsg's ifindex, behind the 16-byte nlmsghdr and its family, pad and type
_IFINDEX = struct.Struct("=20xi")


def decode_link_datagrams(
    datagrams: Iterable[bytes], known: Callable[[int], LinkRecord | None] | None = None
) -> tuple[list[tuple[int, LinkRecord]], int]:
    """Raw netlink datagrams, read one after the other -> ([(RTM_NEWLINK|RTM_DELLINK, record)]
    in order, how many link messages they held).

    Skips other message types and ``AF_BRIDGE`` messages: the bridge sends those when a port
    joins or leaves (an ``RTM_DELLINK`` there means "left the bridge", not "deleted"). A
    message that does not decode is logged and skipped, the rest is kept. An ``RTM_NEWLINK``
    that a later one of the same link supersedes (no ``RTM_DELLINK`` of it between) is not
    decoded: the link table keeps only a link's latest record, and a VM storm's tap sends
    several in a row (made, enslaved, up, carrier), over half of what a gathered read holds.
    Unless it moved a link `known` holds (the link table's record by ifindex, None for a link
    it does not hold): see _moves_among.
    """
    found = [link for data in datagrams for link in _link_messages(data)]
    kept: dict[int, LinkFields] = {}  # position in `found` -> its message decoded
    skipped: list[int] = []
    superseded: set[int | None] = set()  # links with a later RTM_NEWLINK decoded, none deleted since
    for i in range(len(found) - 1, -1, -1):
        msg_type, message, ifindex = found[i]
        if msg_type == RTM_DELLINK:
            superseded.discard(ifindex)
        elif ifindex in superseded:
            skipped.append(i)
            continue
        fields = _fields(message)
        if fields is not None:
            kept[i] = fields
            if msg_type == RTM_NEWLINK:
                superseded.add(ifindex)
    if skipped and known is not None:
        kept.update(_moves_among(found, kept, set(skipped), known))
    return [(found[i][0], _record(kept[i])) for i in sorted(kept)], len(found)


def _moves_among(
    found: list[tuple[int, bytes, int | None]],
    kept: dict[int, LinkFields],
    skipped: set[int],
    known: Callable[[int], LinkRecord | None],
) -> Iterator[tuple[int, LinkFields]]:
    """The superseded messages at which a link the table holds changed master (against the
    message before it, or the table's record for its first), decoded by position: each
    message's counters bound the bytes before it, so the table must see every move (taken off
    a bridge, or to another) at its own message, not at a later one's counters (a tap moved
    and moved back, or moved and then changed in place, in one read). A link the table does
    not hold has no bytes typed yet: its messages stay superseded (a storm's new taps), and
    only the superseded ones' master attribute is read, up to a move."""
    links = {found[i][2] for i in skipped}
    masters: dict[int | None, int | object | None] = {}  # link -> its master so far
    for i, (msg_type, message, ifindex) in enumerate(found):
        if ifindex not in links or ifindex is None:
            continue
        if msg_type == RTM_DELLINK:
            masters[ifindex] = _UNKNOWN  # (made again under that ifindex: a new link)
            continue
        if ifindex not in masters:
            record = known(ifindex)
            masters[ifindex] = record.master if record is not None else _UNKNOWN
        was = masters[ifindex]
        if was is _UNKNOWN:
            continue
        fields = kept.get(i)
        if fields is not None:
            masters[ifindex] = fields.master or None
        elif i in skipped:
            try:
                master = master_of(message)
            except LinkMessageError:
                continue
            if master != was:
                fields = _fields(message)
                if fields is not None:
                    masters[ifindex] = master
                    yield i, fields


_UNKNOWN = object()  # a link the table does not hold


def _fields(message: bytes) -> LinkFields | None:
    """A link message decoded; None when it does not decode (logged), is AF_BRIDGE's or has no name."""
    try:
        fields = link_fields(message)
    except Exception:
        log.exception("undecodable link message (%d bytes) skipped", len(message))
        return None
    return fields if fields.family != AF_BRIDGE and fields.name else None


def _link_messages(data: bytes) -> Iterator[tuple[int, bytes, int | None]]:
    """The link messages of a datagram that are no bridge port's: (type, message, ifindex;
    None when the message is too short to hold one)."""
    offset = 0
    while offset + 16 <= len(data):
        length, msg_type = struct.unpack_from("=IH", data, offset)
        if length < 16 or offset + length > len(data):
            log.warning("truncated netlink message at offset %d (length %d of %d)", offset, length, len(data))
            return
        # AF_BRIDGE messages (a port joined or left a bridge, or changed state: half of what a
        # VM storm sends) are told by the family byte, before anything else is read of them.
        if msg_type in (RTM_NEWLINK, RTM_DELLINK) and (length == 16 or data[offset + 16] != AF_BRIDGE):
            ifindex = _IFINDEX.unpack_from(data, offset)[0] if length >= _IFINDEX.size else None
            yield msg_type, data[offset : offset + length], ifindex
        offset += (length + 3) & ~3


@dataclass
class Received:
    """One read of the event socket: the link messages decoded, in order (decode_link_datagrams),
    whether the kernel reported lost events (ENOBUFS) among them, and how many link messages
    were read (the superseded ones that were not decoded included)."""

    messages: list[tuple[int, LinkRecord]]
    overrun: bool = False
    read: int = 0


class LinkEventSocket:
    """A netlink route socket subscribed to ``RTMGRP_LINK``, read when it has messages or when
    ``wake()`` was called (``stop()``'s way to end a wait without a timeout)."""

    def __init__(self, rcvbuf: int = 4 << 20) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        try:
            # Root may exceed net.core.rmem_max; a VM storm makes many events at once.
            self._sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)  # SO_RCVBUFFORCE
        except OSError:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self._sock.bind((0, RTMGRP_LINK))
        # A thread woken only to look whether it should stop costs about 0.15 ms of CPU per
        # wakeup on a virtual machine: the wait has no timeout, and a pipe ends it instead.
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def receive(self, known: Callable[[int], LinkRecord | None] | None = None) -> Received:
        """Wait until a message comes or ``wake()``, then read until the queue is empty
        (`known`: decode_link_datagrams's).

        After an ENOBUFS the kernel stays silent about further drops until the queue has been
        drained once (NETLINK_S_CONGESTED), so an overrun is noted and the reading goes on: the
        caller re-dumps only with the queue empty, and keeps the messages read (a queued
        RTM_DELLINK still carries final counters)."""
        ready, _, _ = select.select([self._sock, self._wake_read], [], [])
        if self._wake_read in ready:
            ready.remove(self._wake_read)
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_read, 64)
        received = Received([])
        datagrams = []
        while ready:
            try:
                data = self._sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                received.overrun = True
                continue
            datagrams.append(data)
        received.messages, received.read = decode_link_datagrams(datagrams, known)
        return received

    def wake(self) -> None:
        """End the current or the next wait of ``receive`` at once."""
        with contextlib.suppress(BlockingIOError):  # (a wakeup pending already)
            os.write(self._wake_write, b"\0")

    def close(self) -> None:
        self._sock.close()
        os.close(self._wake_read)
        os.close(self._wake_write)


RTM_GETLINK = 18
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST_DUMP = 0x301  # NLM_F_REQUEST | NLM_F_DUMP


class LinkDump:
    """A full link dump, decoded one datagram at a time: what ``Topology.refresh()`` needs of
    ``IPRoute`` (a context manager with ``get_links()``), without holding every decoded message
    of a host with thousands of links at once (``IPRoute.get_links()`` returns them all in one
    tuple, tens of MB at 2,000 links, and the process keeps that peak as resident memory)."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self._sock.bind((0, 0))

    def __enter__(self) -> LinkDump:
        return self

    def __exit__(self, *exc: object) -> None:
        self._sock.close()

    def get_links(self) -> Iterator[Any]:
        """Every link's message (decoded as pyroute2's ``ifinfmsg`` reads), as the kernel sends them."""
        ifinfo = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, 0, 0, 0)
        self._sock.send(
            struct.pack("=IHHII", 16 + len(ifinfo), RTM_GETLINK, NLM_F_REQUEST_DUMP, 1, 0) + ifinfo
        )
        while True:
            data = self._sock.recv(1 << 16)
            offset = 0
            while offset + 16 <= len(data):
                length, msg_type = struct.unpack_from("=IH", data, offset)
                if length < 16 or offset + length > len(data):
                    raise OSError(f"truncated netlink message in a link dump ({length} of {len(data)} bytes)")
                if msg_type == NLMSG_DONE:
                    return
                if msg_type == NLMSG_ERROR:
                    (error,) = struct.unpack_from("=i", data, offset + 16)
                    if error:
                        raise OSError(-error, f"link dump: {os.strerror(-error)}")
                elif msg_type == RTM_NEWLINK:
                    yield decode_link_message(data[offset : offset + length])
                offset += (length + 3) & ~3

    def close(self) -> None:
        self._sock.close()
