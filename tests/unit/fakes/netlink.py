"""Netlink fakes fed with recorded messages (tests/unit/data/netlink/*.hex)."""

from __future__ import annotations

import queue
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from kvmeter.agent.linkevents import Received, decode_link_datagrams, parse_link_message
from kvmeter.agent.linktable import LinkRecord, LinkTable
from kvmeter.agent.traffic import DEFAULT_RULES, TrafficRules

DATA = Path(__file__).parent.parent / "data" / "netlink"


def load_messages(name: str) -> list[bytes]:
    """The raw messages of one recording, in order."""
    lines = (DATA / name).read_text().splitlines()
    return [bytes.fromhex(line) for line in lines if line and not line.startswith("#")]


def message_type(message: bytes) -> int:
    return struct.unpack_from("=IH", message)[1]


def decoded(message: bytes) -> Any:
    msg = ifinfmsg(message)
    msg.decode()
    return msg


def decode_link_datagram(data: bytes) -> list[tuple[int, LinkRecord]]:
    """The link messages of one datagram read alone (decode_link_datagrams)."""
    return decode_link_datagrams([data])[0]


def dumped_table(rules: TrafficRules = DEFAULT_RULES) -> LinkTable:
    """A link table holding the recorded host dump."""
    table = LinkTable(rules)
    table.replace_all(parse_link_message(decoded(m)) for m in load_messages("host_dump.hex"))
    return table


class FakeIPRoute:
    """``IPRoute`` as ``Topology.refresh()`` uses it: a context manager with ``get_links()``."""

    def __init__(self, messages: list[bytes]) -> None:
        self.messages = messages
        self.closed = False

    def __enter__(self) -> FakeIPRoute:
        return self

    def __exit__(self, *exc: object) -> None:
        self.closed = True

    def get_links(self) -> list[Any]:
        return [decoded(m) for m in self.messages]


class FakeEventSocket:
    """Stands in for ``LinkEventSocket``: hands out queued datagrams (and overruns) on receive()."""

    def __init__(self) -> None:
        self.queue: queue.Queue[bytes | None] = queue.Queue()
        self.closed = False

    def push(self, *messages: bytes) -> None:
        self.queue.put(b"".join(messages))

    def overrun(self, *messages: bytes) -> None:
        """The next read returns these messages and reports that others were lost."""
        self.queue.put(None)
        self.queue.put(b"".join(messages))

    def wake(self) -> None:
        self.queue.put(b"")  # no message: receive returns none

    def receive(self, known: Callable[[int], LinkRecord | None] | None = None) -> Received:
        data = self.queue.get()
        overrun = data is None
        if data is None:
            data = self.queue.get() or b""  # (overrun() queues the messages next)
        messages, read = decode_link_datagrams([data], known)
        return Received(messages, overrun=overrun, read=read)

    def close(self) -> None:
        self.closed = True
