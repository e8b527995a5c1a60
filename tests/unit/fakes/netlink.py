"""Netlink fakes fed with recorded messages (tests/unit/data/netlink/*.hex)."""

from __future__ import annotations

import queue
import struct
from pathlib import Path
from typing import Any

from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from kvmeter.agent.topology import LinkEventOverrun, LinkRecord, decode_link_datagram

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
    """Stands in for ``LinkEventSocket``: hands out queued datagrams (or an overrun) on receive()."""

    def __init__(self) -> None:
        self.queue: queue.Queue[bytes | None] = queue.Queue()
        self.closed = False

    def push(self, *messages: bytes) -> None:
        self.queue.put(b"".join(messages))

    def overrun(self) -> None:
        self.queue.put(None)

    def receive(self, timeout: float) -> list[tuple[int, LinkRecord]]:
        try:
            data = self.queue.get(timeout=timeout)
        except queue.Empty:
            return []
        if data is None:
            raise LinkEventOverrun()
        return decode_link_datagram(data)

    def close(self) -> None:
        self.closed = True
