"""Where each host interface sits (bridge, uplink VLAN/VXLAN, traffic type), kept current from
netlink link events, and the link events themselves (a deleted tap's final counters).

Pure core first: :func:`parse_link_message` turns one decoded link message (pyroute2's
``ifinfmsg`` or :class:`kvmeter.agent.rtnl.LinkMessage`, read the same way) into a
:class:`LinkRecord`, :func:`decode_link_datagram` does that for a raw netlink datagram, and
:class:`~kvmeter.agent.linktable.LinkTable` holds the records, answers placements and turns
messages into link events. :class:`Topology` is the thin adapter: one dump at start (:class:`LinkDump`),
then a thread on a netlink socket bound to ``RTMGRP_LINK``; a full re-dump only when the kernel
reports that the socket's buffer overran (ENOBUFS: events were lost).

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
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Callable

from kvmeter.agent.linktable import RTM_DELLINK, RTM_NEWLINK, LinkEvent, LinkRecord, LinkTable
from kvmeter.agent.model import LinkPlacement
from kvmeter.agent.rtnl import LinkFields, decode_link_message, link_fields
from kvmeter.agent.traffic import TrafficRules

log = logging.getLogger(__name__)

RTMGRP_LINK = 0x1
NETLINK_ROUTE = 0
AF_BRIDGE = 7

Listener = Callable[["LinkEvent"], None]
# After a read that found link messages, the event thread waits this long before it reads
# again: a storm's messages are then read a few dozen per wakeup instead of one or two (the
# thread's CPU in a storm round of 200 taps: 210-270 -> 120-130 ms). Later messages of a
# burst are stamped up to this much later; the socket's 4 MB queue holds far more than 20 ms.
GATHER_S = 0.02


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
    )


def decode_link_datagram(data: bytes) -> list[tuple[int, LinkRecord]]:
    """A raw netlink datagram -> [(RTM_NEWLINK|RTM_DELLINK, record)], in order.

    Skips other message types and ``AF_BRIDGE`` messages: the bridge sends those when a port
    joins or leaves (an ``RTM_DELLINK`` there means "left the bridge", not "deleted"). A
    message that does not decode is logged and skipped, the rest of the datagram is kept.
    """
    out: list[tuple[int, LinkRecord]] = []
    offset = 0
    while offset + 16 <= len(data):
        length, msg_type = struct.unpack_from("=IH", data, offset)
        if length < 16 or offset + length > len(data):
            log.warning("truncated netlink message at offset %d (length %d of %d)", offset, length, len(data))
            break
        # AF_BRIDGE messages (a port joined or left a bridge, or changed state: half of what a
        # VM storm sends) are told by the family byte, before any attribute is decoded.
        bridge_port = length > 16 and data[offset + 16] == AF_BRIDGE
        if msg_type in (RTM_NEWLINK, RTM_DELLINK) and not bridge_port:
            try:
                fields = link_fields(data[offset : offset + length])
                if fields.family != AF_BRIDGE and fields.name:
                    out.append((msg_type, _record(fields)))
            except Exception:
                log.exception("undecodable link message (%d bytes) skipped", length)
        offset += (length + 3) & ~3
    return out


@dataclass
class Received:
    """One read of the event socket: the link messages, in order, and whether the kernel
    reported lost events (ENOBUFS) among them."""

    messages: list[tuple[int, LinkRecord]]
    overrun: bool = False


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

    def receive(self) -> Received:
        """Wait until a message comes or ``wake()``, then read until the queue is empty.

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
            received.messages.extend(decode_link_datagram(data))
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


class Topology:
    """Link map of this host's network namespace, current from netlink link events.

    * ``start()``: subscribe to link events, dump all links once, then a background thread
      applies events as they come. Subscribing before the dump means nothing is missed.
    * ``stop()``: end the thread and close the socket (idempotent).
    * ``refresh()``: a synchronous full dump (done by ``start()`` and after an overrun).
    * ``placement(ifname) -> LinkPlacement``, ``ifindex(ifname)``, ``links() -> {name: ifindex}``.
    * ``add_listener(callback)``: ``callback(LinkEvent)`` runs on the event thread for every
      link that appears or is deleted (and for differences found by a re-dump after an overrun;
      not for the links of the first dump). Exceptions in callbacks are logged, not raised.

    ``ipr_factory`` makes what dumps the links (:class:`LinkDump`, or pyroute2's ``IPRoute``);
    ``event_socket_factory`` makes the event socket. Both are called in the thread that calls
    ``start()``/``refresh()`` (network namespaces are per thread). ``gather``: the wait after a
    read that found messages (GATHER_S). The thread waits for events without a timeout
    (``stop()`` ends the wait). Counters: ``overruns``, ``events``, ``dumps``.
    """

    def __init__(
        self,
        rules: TrafficRules,
        *,
        ipr_factory: Callable[[], Any] = LinkDump,
        event_socket_factory: Callable[[], LinkEventSocket] = LinkEventSocket,
        gather: float = GATHER_S,
    ) -> None:
        self._table = LinkTable(rules)
        self._gather = gather
        self._ipr_factory = ipr_factory
        self._event_socket_factory = event_socket_factory
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []
        self._socket: LinkEventSocket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._dumped = False
        self.overruns = 0
        self.events = 0
        self.dumps = 0

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("Topology already started")
        self._stopping.clear()
        self._socket = self._event_socket_factory()
        try:
            self.refresh()
        except BaseException:
            self._socket.close()
            self._socket = None
            raise
        self._thread = threading.Thread(target=self._run, name="kvmeter-topology", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._socket is not None:
            self._socket.wake()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def refresh(self) -> None:
        """Dump all links and replace the map; after the first dump, report the differences."""
        with self._ipr_factory() as ipr:
            records = [parse_link_message(msg) for msg in ipr.get_links()]
        log.debug("dumped %d links", len(records))
        with self._lock:
            events = self._table.replace_all(records)
            first = not self._dumped
            self._dumped = True
            self.dumps += 1
        if not first:
            self._dispatch(events)

    # -- queries (never block on the kernel) -------------------------------------------------
    def placement(self, ifname: str) -> LinkPlacement:
        with self._lock:
            return self._table.placement(ifname)

    def ifindex(self, ifname: str) -> int | None:
        with self._lock:
            return self._table.ifindex(ifname)

    def links(self) -> dict[str, int]:
        """Name -> ifindex of every current link."""
        with self._lock:
            return self._table.links()

    @property
    def generation(self) -> int:
        """Changes whenever links or placements may have changed."""
        with self._lock:
            return self._table.generation

    def changed_since(self, generation: int) -> set[str] | None:
        """LinkTable.changed_since: the links changed after `generation`, None for all."""
        with self._lock:
            return self._table.changed_since(generation)

    def add_listener(self, callback: Listener) -> None:
        with self._lock:
            self._listeners.append(callback)

    def set_rules(self, rules: TrafficRules) -> None:
        """New traffic rules (SIGHUP): every placement is classified again."""
        with self._lock:
            self._table.rules = rules
            self._table._changed()

    # -- event thread ------------------------------------------------------------------------
    def apply(self, messages: Iterable[tuple[int, LinkRecord]]) -> None:
        """Apply decoded link messages and dispatch the events (the thread's work; tests call it)."""
        events = []
        with self._lock:
            for msg_type, record in messages:
                event = self._table.apply(msg_type, record)
                if event is not None:
                    events.append(event)
        self._dispatch(events)

    def _run(self) -> None:
        assert self._socket is not None
        while not self._stopping.is_set():
            try:
                received = self._socket.receive()
            except OSError:
                log.exception("reading link events failed; re-dumping links")
                self._stopping.wait(1.0)
                self._redump()
                continue
            self.apply(received.messages)
            if received.overrun:
                self.overruns += 1
                log.warning("netlink link events were lost (socket buffer overrun); re-dumping links")
                self._redump()
            elif received.messages:
                # Messages come in bursts (a VM storm: eight per tap, a few hundred taps): let
                # the kernel queue the rest of the burst and read it in one wakeup, rather than
                # wake for each message. The first message of a burst is read at once.
                self._stopping.wait(self._gather)

    def _redump(self) -> None:
        """Dump until it works (or stop): a stale map must not outlive a failed dump."""
        delay = 0.5
        while not self._stopping.is_set():
            try:
                self.refresh()
                return
            except Exception:
                log.exception("link dump failed; retrying in %.1f s", delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, 30.0)

    def _dispatch(self, events: list[LinkEvent]) -> None:
        if not events:
            return
        with self._lock:
            listeners = list(self._listeners)
        for event in events:
            self.events += 1
            for callback in listeners:
                try:
                    callback(event)
                except Exception:
                    log.exception("link event listener %r failed on %s", callback, event)
