"""Every link's counters in one netlink dump: RTM_GETSTATS with only IFLA_STATS_LINK_64 asked for.

The same numbers as /proc/net/dev (both are the kernel's dev_get_stats), for about a third of the
CPU: the kernel copies binary counters instead of printing sixteen decimal numbers per line, and
the dump is cut into columns without a Python step per link. Keyed by ifindex, which is also what
a counter identity holds (the names come from the topology's map).

When every message of a reply has the same shape (the usual case: one attribute each, the same
struct size), a reply is read as arrays of native words and sliced into columns. A reply of
another shape (a padding attribute, an interrupted dump's flag) goes through a walk of its
messages, one at a time. A kernel without RTM_GETSTATS (before 4.7) answers with an error: the
agent then reads /proc/net/dev (counters.KernelTable).
"""

from __future__ import annotations

import socket
import struct
from array import array
from collections.abc import Callable
from typing import Any, NamedTuple

from kvmeter.agent.rtnl import NLA_HDR, NLA_TYPE_MASK, NLMSG_HDRLEN, attributes

RTM_NEWSTATS = 92
RTM_GETSTATS = 94
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_DUMP = 0x300
IFLA_STATS_LINK_64 = 1
FILTER_LINK_64 = 1 << (IFLA_STATS_LINK_64 - 1)

NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, seq, port id
IF_STATS_MSG = struct.Struct("=BxxxII")  # family, pads, ifindex, filter mask
# rx_packets, tx_packets, rx_bytes, tx_bytes: the first four fields of struct rtnl_link_stats64
STATS64_HEAD = struct.Struct("=QQQQ")
ERRNO = struct.Struct("=i")
STATS_AT = NLMSG_HDRLEN + IF_STATS_MSG.size  # the first attribute of a stats message
COUNTERS_AT = STATS_AT + NLA_HDR.size  # its payload
_STATS_ATTRIBUTES = frozenset({IFLA_STATS_LINK_64 & NLA_TYPE_MASK})
RECV_BYTES = 1 << 16  # a dump's replies are at most 32 KiB each

if array("I").itemsize != 4 or array("Q").itemsize != 8:  # pragma: no cover - every Linux ABI
    raise ImportError("array('I') / array('Q') are not 32 / 64 bits here")


class StatsDumpError(OSError):
    """The stats dump failed or did not have the expected shape."""


class LinkCounters(NamedTuple):
    """Columns in the dump's order: ifindex, rx_bytes, rx_packets, tx_bytes, tx_packets."""

    ifindexes: list[int]
    rx_bytes: list[int]
    rx_packets: list[int]
    tx_bytes: list[int]
    tx_packets: list[int]


def request(seq: int) -> bytes:
    """A dump request for every link's 64-bit counters (nothing else)."""
    body = IF_STATS_MSG.pack(socket.AF_UNSPEC, 0, FILTER_LINK_64)
    return NLMSGHDR.pack(NLMSG_HDRLEN + len(body), RTM_GETSTATS, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def parse_reply(data: bytes, seq: int, out: LinkCounters) -> bool:
    """Append one reply's links to `out`; True when it ends the dump (NLMSG_DONE)."""
    if len(data) < NLMSG_HDRLEN:
        raise StatsDumpError(f"a reply of {len(data)} bytes")
    length = NLMSGHDR.unpack_from(data)[0]
    if length >= COUNTERS_AT + STATS64_HEAD.size and length % 8 == 0:
        whole, tail = divmod(len(data), length)
        if whole and _columns(memoryview(data)[: whole * length], length, whole, seq, out):
            if not tail:
                return False
            return _walk(data, whole * length, seq, out)
    return _walk(data, 0, seq, out)


def _columns(body: memoryview, length: int, count: int, seq: int, out: LinkCounters) -> bool:
    """`count` stats messages of `length` bytes each, as arrays: False (nothing appended) when
    any header differs from a single IFLA_STATS_LINK_64 stats message of this dump."""
    words = array("I")
    words.frombytes(body)
    step = length // 4
    head = RTM_NEWSTATS | NLM_F_MULTI << 16  # type and flags, as one native word
    attr = (length - STATS_AT) | IFLA_STATS_LINK_64 << 16  # its attribute's length and type
    if (
        words[0::step].count(length) != count
        or words[1::step].count(head) != count
        or words[2::step].count(seq) != count
        or words[STATS_AT // 4 :: step].count(attr) != count
    ):
        return False
    wide = array("Q")
    wide.frombytes(body)
    step8 = length // 8
    first = COUNTERS_AT // 8
    out.ifindexes.extend(words[NLMSG_HDRLEN // 4 + 1 :: step])
    out.rx_packets.extend(wide[first::step8])
    out.tx_packets.extend(wide[first + 1 :: step8])
    out.rx_bytes.extend(wide[first + 2 :: step8])
    out.tx_bytes.extend(wide[first + 3 :: step8])
    return True


def _walk(data: bytes, offset: int, seq: int, out: LinkCounters) -> bool:
    """The messages from `offset` one by one; True at NLMSG_DONE."""
    end = len(data)
    while offset + NLMSG_HDRLEN <= end:
        length, kind, _flags, got_seq, _port = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSG_HDRLEN or offset + length > end:
            raise StatsDumpError(f"a message of length {length} at offset {offset} overruns the reply")
        if got_seq != seq:
            raise StatsDumpError(f"a reply to request {got_seq}, not {seq}")
        if kind == NLMSG_DONE:
            return True
        if kind == NLMSG_ERROR:
            errno = -ERRNO.unpack_from(data, offset + NLMSG_HDRLEN)[0]
            raise StatsDumpError(errno, f"RTM_GETSTATS refused: errno {errno}")
        if kind == RTM_NEWSTATS:
            ifindex = IF_STATS_MSG.unpack_from(data, offset + NLMSG_HDRLEN)[1]
            attrs = attributes(data, offset + STATS_AT, offset + length, _STATS_ATTRIBUTES)
            stats = attrs.get(IFLA_STATS_LINK_64 & NLA_TYPE_MASK)
            if stats is None or len(stats) < STATS64_HEAD.size:
                raise StatsDumpError(f"no 64-bit counters for ifindex {ifindex}")
            rx_packets, tx_packets, rx_bytes, tx_bytes = STATS64_HEAD.unpack_from(stats)
            out.ifindexes.append(ifindex)
            out.rx_bytes.append(rx_bytes)
            out.rx_packets.append(rx_packets)
            out.tx_bytes.append(tx_bytes)
            out.tx_packets.append(tx_packets)
        offset += (length + 3) & ~3
    return False


def _route_socket() -> Any:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    sock.settimeout(5.0)
    sock.bind((0, 0))
    return sock


class NetlinkStats:
    """One netlink socket kept across polls; a dump that failed half way closes it (a new one
    next time, so no stale reply is ever read as the next dump's)."""

    def __init__(self, open_socket: Callable[[], Any] = _route_socket) -> None:
        self._open = open_socket
        self._sock: Any = None
        self._seq = 0

    def read(self) -> LinkCounters:
        out = LinkCounters([], [], [], [], [])
        if self._sock is None:
            self._sock = self._open()
        self._seq = self._seq % 0xFFFFFFFF + 1
        try:
            self._sock.send(request(self._seq))
            while not parse_reply(self._sock.recv(RECV_BYTES), self._seq, out):
                pass
        except BaseException:
            self.close()
            raise
        return out

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
