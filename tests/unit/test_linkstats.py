"""The netlink stats dump (agent.linkstats): replies cut into columns, the walk of replies of
another shape, errors, and the table's fall-back to /proc/net/dev."""

from __future__ import annotations

import errno
import struct
from typing import Any

import pytest

from kvmeter.agent.counters import KernelTable
from kvmeter.agent.linkstats import (
    IFLA_STATS_LINK_64,
    NLM_F_MULTI,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSGHDR,
    RTM_GETSTATS,
    RTM_NEWSTATS,
    LinkCounters,
    NetlinkStats,
    StatsDumpError,
    parse_reply,
    request,
)

NLM_F_DUMP_INTR = 0x10
FIELDS = 25  # u64 fields of struct rtnl_link_stats64 on a 6.x kernel (older ones have fewer)


def stats_message(
    seq: int, ifindex: int, counts: tuple[int, int, int, int], *, flags: int = NLM_F_MULTI, pad: bool = False
) -> bytes:
    """One RTM_NEWSTATS message: (rx_bytes, rx_packets, tx_bytes, tx_packets) of a link."""
    rx_bytes, rx_packets, tx_bytes, tx_packets = counts
    values = [rx_packets, tx_packets, rx_bytes, tx_bytes] + [7] * (FIELDS - 4)
    payload = struct.pack(f"={FIELDS}Q", *values)
    attrs = struct.pack("=HH", 4 + len(payload), IFLA_STATS_LINK_64) + payload
    if pad:  # IFLA_STATS_UNSPEC padding, as kernels without efficient unaligned access add
        attrs = struct.pack("=HHI", 8, 0, 0) + attrs
    body = struct.pack("=BxxxII", 0, ifindex, 1) + attrs
    return NLMSGHDR.pack(16 + len(body), RTM_NEWSTATS, flags, seq, 0) + body


def done(seq: int) -> bytes:
    return NLMSGHDR.pack(20, NLMSG_DONE, NLM_F_MULTI, seq, 0) + struct.pack("=i", 0)


def error(seq: int, code: int) -> bytes:
    return NLMSGHDR.pack(36, NLMSG_ERROR, 0, seq, 0) + struct.pack("=i", -code) + b"\0" * 16


LINKS = {1: (100, 2, 300, 4), 7: (2**64 - 1, 5, 0, 0), 4096: (10, 1, 20, 2)}


def parse(replies: list[bytes], seq: int = 9) -> tuple[LinkCounters, list[bool]]:
    out = LinkCounters([], [], [], [], [])
    return out, [parse_reply(r, seq, out) for r in replies]


def expected() -> LinkCounters:
    return LinkCounters(list(LINKS), *([c[i] for c in LINKS.values()] for i in range(4)))


def test_request_asks_every_link_for_its_64_bit_counters_only() -> None:
    data = request(42)
    length, kind, flags, seq, _ = NLMSGHDR.unpack_from(data)
    assert (length, kind, flags & 0x300, seq) == (len(data), RTM_GETSTATS, 0x300, 42)
    assert struct.unpack_from("=BxxxII", data, 16) == (0, 0, 1)  # every link, IFLA_STATS_LINK_64


@pytest.mark.parametrize("split", [False, True], ids=["one reply", "a reply per message"])
def test_replies_of_one_shape_become_columns(split: bool) -> None:
    messages = [stats_message(9, i, c) for i, c in LINKS.items()] + [done(9)]
    replies = messages if split else [b"".join(messages)]
    out, ends = parse(replies)
    assert out == expected()
    assert ends == [False] * (len(replies) - 1) + [True]


@pytest.mark.parametrize(
    "odd",
    [{"flags": NLM_F_MULTI | NLM_F_DUMP_INTR}, {"pad": True}],
    ids=["interrupted dump flag", "padding attribute"],
)
def test_a_message_of_another_shape_is_walked_with_the_same_result(odd: dict[str, Any]) -> None:
    items = list(LINKS.items())
    messages = [stats_message(9, *items[0]), stats_message(9, *items[1], **odd), stats_message(9, *items[2])]
    out, ends = parse([b"".join(messages) + done(9)])
    assert out == expected()
    assert ends == [True]


def test_an_error_reply_names_its_errno() -> None:
    with pytest.raises(StatsDumpError) as caught:
        parse([error(9, errno.EOPNOTSUPP)])
    assert caught.value.errno == errno.EOPNOTSUPP


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (stats_message(8, 1, (1, 1, 1, 1)) + done(8), "a reply to request 8, not 9"),
        (stats_message(9, 1, (1, 1, 1, 1))[:-8], "overruns the reply"),
        (b"\0" * 10, "a reply of 10 bytes"),
    ],
    ids=["stale request", "truncated", "short"],
)
def test_a_reply_not_of_this_dump_is_refused(reply: bytes, message: str) -> None:
    with pytest.raises(StatsDumpError, match=message):
        parse([reply])


class FakeSocket:
    def __init__(self, replies: list[bytes]) -> None:
        self.replies = replies
        self.sent: list[bytes] = []
        self.closed = False

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)

    def recv(self, size: int) -> bytes:
        seq = NLMSGHDR.unpack_from(self.sent[-1])[3]
        reply = self.replies.pop(0)
        if reply == b"done":
            return done(seq)
        if reply == b"link":
            return stats_message(seq, 3, (30, 3, 40, 4))
        raise OSError(errno.EAGAIN, "timed out")

    def close(self) -> None:
        self.closed = True


def test_a_dump_that_fails_half_way_leaves_its_socket_for_a_new_one() -> None:
    sockets = [FakeSocket([b"link", b"fail"]), FakeSocket([b"link", b"done"])]
    made = list(sockets)
    reader = NetlinkStats(lambda: made.pop(0))
    with pytest.raises(OSError, match="timed out"):
        reader.read()
    assert sockets[0].closed
    assert reader.read() == LinkCounters([3], [30], [3], [40], [4])
    assert not sockets[1].closed
    reader.close()
    assert sockets[1].closed


TEXT = b"""Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
 vnet1:     742       9    0    0    0     0          0         0     1000      3    0    0    0     0       0          0
"""  # noqa: E501


def test_the_table_reads_proc_net_dev_from_the_first_dump_that_fails_on(caplog: Any) -> None:
    calls = []

    def refused() -> LinkCounters:
        calls.append(1)
        raise StatsDumpError(errno.EOPNOTSUPP, "RTM_GETSTATS refused")

    table = KernelTable(netlink=refused)
    table._read_text = lambda: TEXT  # the fall-back's source, here a captured table
    for _ in range(2):
        read = table.read()
        assert (read.names, read.rx_bytes, read.tx_packets, read.ifindexes) == (["vnet1"], [742], [3], None)
    assert calls == [1]
    assert "reading /proc/net/dev from now on" in caplog.text


def test_the_netlink_table_keys_rows_by_ifindex() -> None:
    table = KernelTable(netlink=lambda: LinkCounters([5, 9], [1, 2], [3, 4], [5, 6], [7, 8]))
    read = table.read()
    assert read.ifindexes == [5, 9]
    assert (read.names, read.rx_bytes, read.rx_packets, read.tx_bytes, read.tx_packets) == (
        [],
        [1, 2],
        [3, 4],
        [5, 6],
        [7, 8],
    )
