"""Where each host interface sits (bridge, uplink VLAN/VXLAN, traffic type), kept current from
netlink link events, and the link events themselves (a deleted tap's final counters).

Pure core first: :func:`parse_link_message` turns one decoded link message (pyroute2's
``ifinfmsg`` or :class:`kvmeter.agent.rtnl.LinkMessage`, read the same way) into a
:class:`LinkRecord`, :func:`decode_link_datagram` does that for a raw netlink datagram, and
:class:`LinkTable` holds the records, answers placements and turns messages into
:class:`LinkEvent` s. :class:`Topology` is the thin adapter: one dump at start (:class:`LinkDump`),
then a thread on a netlink socket bound to ``RTMGRP_LINK``; a full re-dump only when the kernel
reports that the socket's buffer overran (ENOBUFS: events were lost).

Why the event socket is a plain ``AF_NETLINK`` socket and not ``IPRoute.bind()``: ``get()``
blocks until the next message with no timeout in 0.7.2, and in 0.9.x an ENOBUFS poisons the
``IPRoute`` object for good; a plain socket + ``select`` stops promptly and survives overruns.
Events and dumps alike are decoded by :mod:`kvmeter.agent.rtnl` (same code path), which
spares the agent pyroute2's import (~20 MB resident); ``IPRoute`` still works as a dumper.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import sys
import threading
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Callable

from kvmeter.agent.model import SLOTS, LinkPlacement
from kvmeter.agent.rtnl import decode_link_message
from kvmeter.agent.traffic import TrafficRules

log = logging.getLogger(__name__)

RTM_NEWLINK = 16
RTM_DELLINK = 17
RTMGRP_LINK = 0x1
NETLINK_ROUTE = 0
AF_BRIDGE = 7
UPLINK_KINDS = ("vlan", "vxlan")
LOWER_DEVICE_KINDS = ("macvtap", "macvlan", "ipvlan", "ipvtap")  # IFLA_LINK is their parent
CHANGE_LOG_SIZE = 1 << 16  # link changes remembered for changed_since (a reader further behind rebuilds)

# (rx_bytes, rx_packets, tx_bytes, tx_packets), host side, as the kernel counts them.
Stats = tuple[int, int, int, int]
Listener = Callable[["LinkEvent"], None]


@dataclass(frozen=True, **SLOTS)
class LinkEvent:
    """A link appeared (``kind="new"``) or was deleted (``kind="del"``).

    ``stats`` are the counters carried by the message itself (``IFLA_STATS64``): for ``del``
    they are the interface's final counters, taken by the kernel as it removed the device, so
    the bytes between the last poll and a VM stop/reboot/unplug are not lost. ``stats`` is None
    when the message had none, and for ``del`` events synthesised after a netlink overrun (the
    link vanished while events were being dropped; its tail is unknown). No timestamp: the
    consumer stamps time when it receives the event.

    Taps (KVM's NICs) count their own traffic, so their ``del`` stats are complete both ways. A
    veth reads its rx from its peer and veth unlinks the pair before the kernel builds the
    message: a veth's ``del`` carries its tx but rx 0 (tests that model VMs with veths take
    note).
    """

    kind: str  # "new" | "del"
    ifname: str
    ifindex: int
    stats: Stats | None = None


@dataclass(frozen=True, **SLOTS)
class LinkRecord:
    """What one link message says about a link."""

    ifindex: int
    ifname: str
    kind: str | None = None  # IFLA_INFO_KIND: bridge, veth, tun, vxlan, vlan, macvtap, ...
    master: int | None = None  # IFLA_MASTER: the bridge (or bond, ovs-system) it is a port of
    link: int | None = None  # IFLA_LINK: parent (vlan, macvtap) or peer (veth) ifindex
    vlan_id: int | None = None
    vxlan_vni: int | None = None
    stats: Stats | None = None


def _nested_attr(msg: Any, *names: str) -> Any:
    for name in names:
        if msg is None:
            return None
        msg = msg.get_attr(name)
    return msg


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
                msg = decode_link_message(data[offset : offset + length])
                if msg["family"] != AF_BRIDGE and msg.get_attr("IFLA_IFNAME"):
                    out.append((msg_type, parse_link_message(msg)))
            except Exception:
                log.exception("undecodable link message (%d bytes) skipped", length)
        offset += (length + 3) & ~3
    return out


class LinkTable:
    """All links of one network namespace, by ifindex. Pure: no I/O, no clock, not thread-safe."""

    def __init__(self, rules: TrafficRules) -> None:
        self.rules = rules
        self._links: dict[int, LinkRecord] = {}
        self._by_name: dict[str, int] = {}
        self._uplink_of: dict[int, LinkRecord] | None = None  # bridge ifindex -> uplink port
        self._placements: dict[str, LinkPlacement] = {}
        # master ifindex -> the placement of its ports (shared: every VM tap on a bridge has the
        # same one; a storm's new taps find theirs made)
        self._port_placements: dict[int, LinkPlacement] = {}
        # ifindex -> how many links' placements read it: their master, a macvtap's parent
        self._read_by: dict[int, int] = {}
        # Bumped on every change: a reader that saw the same generation saw the same links and
        # placements (the poll loop keeps what it derives from them until this moves).
        self.generation = 0
        # The names of the links each generation changed, in order, complete after _log_start
        # (a change that may move every placement empties it): see changed_since.
        self._log_generations: list[int] = []
        self._log_names: list[str] = []
        self._log_start = 0

    def __len__(self) -> int:
        return len(self._links)

    def apply(self, msg_type: int, record: LinkRecord) -> LinkEvent | None:
        """Apply one message; return the event it means, if any.

        ``RTM_NEWLINK`` for an unknown ifindex (or a known one under a new name) -> ``new``;
        for a known link it only updates the record (master, state changes). ``RTM_DELLINK``
        -> ``del`` always, even for a link the table never saw (it may have been created and
        deleted between the dump and the subscription).
        """
        if msg_type == RTM_DELLINK:
            self._remove(record.ifindex)
            return LinkEvent("del", record.ifname, record.ifindex, record.stats)
        previous = self._links.get(record.ifindex)
        if previous is not None and _same_place(previous, record):
            return None
        if previous is not None:
            self._remove(record.ifindex)
        self._links[record.ifindex] = _kept(record)
        self._by_name[record.ifname] = record.ifindex
        for index in _reads(record):
            self._read_by[index] = self._read_by.get(index, 0) + 1
        self._changed(record)
        if previous is None or previous.ifname != record.ifname:
            return LinkEvent("new", record.ifname, record.ifindex, record.stats)
        return None

    def replace_all(self, records: Iterable[LinkRecord]) -> list[LinkEvent]:
        """Replace the table with a full dump; return events for what differs from before
        (``del`` without stats for links gone unseen, ``new`` for links that appeared)."""
        fresh = {r.ifindex: r for r in records}
        events = [
            LinkEvent("del", old.ifname, old.ifindex, None)
            for index, old in sorted(self._links.items())
            if index not in fresh or fresh[index].ifname != old.ifname
        ]
        events.extend(
            LinkEvent("new", new.ifname, new.ifindex, new.stats)
            for index, new in sorted(fresh.items())
            if index not in self._links or self._links[index].ifname != new.ifname
        )
        self._links = {index: _kept(record) for index, record in fresh.items()}
        self._by_name = {r.ifname: r.ifindex for r in fresh.values()}
        self._read_by = {}
        for record in fresh.values():
            for index in _reads(record):
                self._read_by[index] = self._read_by.get(index, 0) + 1
        self._changed()
        return events

    def ifindex(self, ifname: str) -> int | None:
        return self._by_name.get(ifname)

    def changed_since(self, generation: int) -> set[str] | None:
        """The names of the links that came, went or moved after `generation` (the only ones
        whose ifindex or placement may differ from what a reader saw then); None when every
        placement may have changed since (a bridge or an uplink changed, a re-dump, new rules)
        or the reader is too far behind."""
        if generation < self._log_start:
            return None
        return set(self._log_names[bisect_right(self._log_generations, generation) :])

    def links(self) -> dict[str, int]:
        return dict(self._by_name)

    def record(self, ifname: str) -> LinkRecord | None:
        index = self._by_name.get(ifname)
        return self._links.get(index) if index is not None else None

    def placement(self, ifname: str) -> LinkPlacement:
        """Bridge = the link's master; uplink = that bridge's VLAN or VXLAN port (lowest ifindex
        if several). A macvtap/macvlan has no bridge; its parent is the uplink when that is a
        VLAN/VXLAN device. Unknown names get an unplaced placement classified by the rules."""
        cached = self._placements.get(ifname)
        if cached is not None:
            return cached
        record = self.record(ifname)
        bridge: LinkRecord | None = None
        uplink: LinkRecord | None = None
        if record is not None and record.master is not None:
            shared = self._port_placements.get(record.master)
            if shared is not None:
                self._placements[ifname] = shared
                return shared
            bridge = self._links.get(record.master)
            if bridge is not None:
                uplink = self._uplinks().get(bridge.ifindex)
        elif record is not None and record.kind in LOWER_DEVICE_KINDS and record.link is not None:
            lower = self._links.get(record.link)
            if lower is not None and lower.kind in UPLINK_KINDS:
                uplink = lower
        bridge_name = bridge.ifname if bridge is not None else None
        vlan_id = uplink.vlan_id if uplink is not None else None
        vni = uplink.vxlan_vni if uplink is not None else None
        placement = LinkPlacement(
            bridge=bridge_name,
            vlan_id=vlan_id,
            vxlan_vni=vni,
            traffic_type=self.rules.classify(bridge_name, vlan_id, vni),
            uplink=uplink.ifname if uplink is not None else None,
        )
        if record is not None:
            self._placements[ifname] = placement
            if record.master is not None:
                self._port_placements[record.master] = placement
        return placement

    def _uplinks(self) -> dict[int, LinkRecord]:
        if self._uplink_of is None:
            uplinks: dict[int, LinkRecord] = {}
            for record in sorted(self._links.values(), key=lambda r: r.ifindex, reverse=True):
                if record.master is not None and record.kind in UPLINK_KINDS:
                    uplinks[record.master] = record
            self._uplink_of = uplinks
        return self._uplink_of

    def _remove(self, ifindex: int) -> None:
        old = self._links.pop(ifindex, None)
        if old is not None:
            if self._by_name.get(old.ifname) == ifindex:
                del self._by_name[old.ifname]
            for index in _reads(old):
                left = self._read_by[index] - 1
                if left:
                    self._read_by[index] = left
                else:
                    del self._read_by[index]
            self._changed(old)

    def _changed(self, record: LinkRecord | None = None) -> None:
        """A link came, went or moved (None: all of them). Placements computed before stay
        valid unless they could depend on it: a VM's tap coming or going changes no other
        link's placement, so a host of thousands keeps them when one VM starts or stops."""
        self.generation += 1
        if record is None or self._others_depend_on(record):
            self._uplink_of = None
            self._placements = {}
            self._port_placements = {}
            self._log_generations, self._log_names = [], []
            self._log_start = self.generation
        else:
            self._placements.pop(record.ifname, None)
            self._port_placements.pop(record.ifindex, None)  # computed while no port read it
            if len(self._log_names) >= CHANGE_LOG_SIZE:
                half = CHANGE_LOG_SIZE // 2
                self._log_start = self._log_generations[half - 1]
                del self._log_generations[:half], self._log_names[:half]
            self._log_generations.append(self.generation)
            self._log_names.append(record.ifname)

    def _others_depend_on(self, record: LinkRecord) -> bool:
        """Whether another link's placement may read this one: a bridge or other master, an
        uplink (VLAN/VXLAN device), or the parent of a macvtap and the like."""
        if record.kind == "bridge" or record.kind in UPLINK_KINDS:
            return True
        return record.ifindex in self._read_by


def _kept(record: LinkRecord) -> LinkRecord:
    """A record as the table keeps it: without the counters its message carried (only that
    message's event needs them; ten thousand links would keep ~2 MB of them)."""
    return record if record.stats is None else replace(record, stats=None)


def _reads(record: LinkRecord) -> tuple[int, ...]:
    """The other links a link's placement reads: its master, and a macvtap's (or the like's)
    parent. Not a veth's IFLA_LINK: that is its peer, often in another namespace, whose
    ifindex may be anything here."""
    master = (record.master,) if record.master is not None else ()
    if record.link is not None and record.kind in LOWER_DEVICE_KINDS:
        return (*master, record.link)
    return master


def _same_place(a: LinkRecord, b: LinkRecord) -> bool:
    """Equal apart from counters (which change on every message)."""
    return (a.ifname, a.kind, a.master, a.link, a.vlan_id, a.vxlan_vni) == (
        b.ifname,
        b.kind,
        b.master,
        b.link,
        b.vlan_id,
        b.vxlan_vni,
    )


@dataclass
class Received:
    """One read of the event socket: the link messages, in order, and whether the kernel
    reported lost events (ENOBUFS) among them."""

    messages: list[tuple[int, LinkRecord]]
    overrun: bool = False


class LinkEventSocket:
    """A netlink route socket subscribed to ``RTMGRP_LINK``, read with a timeout."""

    def __init__(self, rcvbuf: int = 4 << 20) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        try:
            # Root may exceed net.core.rmem_max; a VM storm makes many events at once.
            self._sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)  # SO_RCVBUFFORCE
        except OSError:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self._sock.bind((0, RTMGRP_LINK))

    def receive(self, timeout: float) -> Received:
        """Wait up to ``timeout`` s, then read until the queue is empty.

        After an ENOBUFS the kernel stays silent about further drops until the queue has been
        drained once (NETLINK_S_CONGESTED), so an overrun is noted and the reading goes on: the
        caller re-dumps only with the queue empty, and keeps the messages read (a queued
        RTM_DELLINK still carries final counters)."""
        ready, _, _ = select.select([self._sock], [], [], timeout)
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

    def close(self) -> None:
        self._sock.close()


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
    ``start()``/``refresh()`` (network namespaces are per thread). Counters: ``overruns``,
    ``events``, ``dumps``.
    """

    def __init__(
        self,
        rules: TrafficRules,
        *,
        ipr_factory: Callable[[], Any] = LinkDump,
        event_socket_factory: Callable[[], LinkEventSocket] = LinkEventSocket,
        poll_interval: float = 0.5,
    ) -> None:
        self._table = LinkTable(rules)
        self._ipr_factory = ipr_factory
        self._event_socket_factory = event_socket_factory
        self._poll_interval = poll_interval
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
                received = self._socket.receive(self._poll_interval)
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
