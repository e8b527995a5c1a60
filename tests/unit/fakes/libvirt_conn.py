"""A hand-written fake of the part of a libvirt connection the inventory uses, fed captured
domain XML (tests/unit/data/domains). Errors are real ``libvirt.libvirtError`` subclasses with
the codes libvirt uses, so the inventory's error handling is the production one."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt

DOMAINS = Path(__file__).parent.parent / "data" / "domains"


class FakeLibvirtError(libvirt.libvirtError):
    def __init__(self, message: str, code: int = libvirt.VIR_ERR_INTERNAL_ERROR) -> None:
        Exception.__init__(self, message)
        self.err = None
        self.code = code

    def get_error_code(self) -> int:
        return self.code


def no_domain() -> FakeLibvirtError:
    return FakeLibvirtError("Domain not found", libvirt.VIR_ERR_NO_DOMAIN)


def xml_of(name: str) -> str:
    return (DOMAINS / f"{name}.xml").read_text()


class FakeDomain:
    def __init__(
        self, conn: FakeConnection, uuid: str, xml: str, state: int = libvirt.VIR_DOMAIN_RUNNING
    ) -> None:
        self.conn = conn
        self.uuid = uuid
        self.xml = xml
        self.state_code = state
        self.xml_calls = 0
        self.block: threading.Event | None = None  # set: calls hang until it is set
        self.stats: dict[str, tuple[int, ...]] = {}

    def _maybe_hang(self) -> None:
        self.conn.check()
        if self.block is not None:
            self.block.wait()
        if self.uuid not in self.conn.domains:
            raise no_domain()

    def UUIDString(self) -> str:
        return self.uuid

    def XMLDesc(self, flags: int = 0) -> str:
        self.xml_calls += 1
        self._maybe_hang()
        return self.xml

    def state(self) -> list[int]:
        self._maybe_hang()
        return [self.state_code, 1]

    def interfaceStats(self, path: str) -> tuple[int, ...]:
        self._maybe_hang()
        if path not in self.stats:
            raise FakeLibvirtError(f"'{path}' is not a known interface", libvirt.VIR_ERR_INVALID_ARG)
        return self.stats[path]


class FakeConnection:
    """Domains by UUID; events and the close callback are fired by the test."""

    def __init__(self, *names: str) -> None:
        self.domains: dict[str, FakeDomain] = {}
        self.alive = True
        self.closed = False
        self.callbacks: dict[int, tuple[int, Callable[..., None]]] = {}
        self.close_callback: Callable[..., None] | None = None
        self._next_id = 1
        for name in names:
            self.add(xml_of(name))

    # -- test helpers ---------------------------------------------------------------------------
    def add(self, xml: str, state: int = libvirt.VIR_DOMAIN_RUNNING) -> FakeDomain:
        uuid = xml.split("<uuid>", 1)[1].split("</uuid>", 1)[0].strip().lower()
        domain = FakeDomain(self, uuid, xml, state)
        self.domains[uuid] = domain
        return domain

    def fire(self, event_id: int, domain: FakeDomain, *args: Any) -> None:
        for registered, callback in list(self.callbacks.values()):
            if registered == event_id:
                callback(self, domain, *args, None)

    def die(self) -> None:
        """libvirtd went away: calls fail, the close callback fires."""
        self.alive = False
        if self.close_callback is not None:
            self.close_callback(self, libvirt.VIR_CONNECT_CLOSE_REASON_EOF, None)

    def check(self) -> None:
        if not self.alive or self.closed:
            raise FakeLibvirtError("internal error: client socket is closed", libvirt.VIR_ERR_INTERNAL_ERROR)

    # -- the libvirt API the inventory uses -----------------------------------------------------
    def listAllDomains(self, flags: int = 0) -> list[FakeDomain]:
        self.check()
        return list(self.domains.values())

    def lookupByUUIDString(self, uuid: str) -> FakeDomain:
        self.check()
        try:
            return self.domains[uuid.lower()]
        except KeyError:
            raise no_domain() from None

    def domainEventRegisterAny(
        self, dom: Any, event_id: int, callback: Callable[..., None], opaque: Any
    ) -> int:
        self.check()
        callback_id = self._next_id
        self._next_id += 1
        self.callbacks[callback_id] = (event_id, callback)
        return callback_id

    def domainEventDeregisterAny(self, callback_id: int) -> None:
        self.check()
        del self.callbacks[callback_id]

    def registerCloseCallback(self, callback: Callable[..., None], opaque: Any) -> int:
        self.check()
        self.close_callback = callback
        return 0

    def unregisterCloseCallback(self) -> None:
        self.check()
        self.close_callback = None

    def isAlive(self) -> int:
        return int(self.alive and not self.closed)

    def close(self) -> int:
        self.closed = True
        return 0


class FakeOpener:
    """``opener`` for the inventory: hands out connections, failing while ``failures`` > 0."""

    def __init__(self, make: Callable[[], FakeConnection], failures: int = 0) -> None:
        self.make = make
        self.failures = failures
        self.calls: list[str] = []
        self.connections: list[FakeConnection] = []

    def __call__(self, uri: str) -> FakeConnection:
        self.calls.append(uri)
        if self.failures > 0:
            self.failures -= 1
            raise FakeLibvirtError(
                "Failed to connect socket: No such file or directory", libvirt.VIR_ERR_SYSTEM_ERROR
            )
        conn = self.make()
        self.connections.append(conn)
        return conn
