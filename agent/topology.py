"""Where each host interface sits (bridge, uplink VLAN/VXLAN, traffic type), kept current from
netlink link events, and the link events themselves (a deleted tap's final counters).

:class:`~kvmeter.agent.linktable.LinkTable` (pure) holds the link records, answers placements
and turns messages into link events; :mod:`kvmeter.agent.linkevents` decodes the messages and
reads them from the kernel. :class:`Topology` is the thin adapter: one dump at start
(:class:`~kvmeter.agent.linkevents.LinkDump`), then a thread on a netlink socket bound to
``RTMGRP_LINK``; a full re-dump only when the kernel reports that the socket's buffer overran
(ENOBUFS: events were lost).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from operator import attrgetter
from typing import Any, Callable

from kvmeter.agent.linkevents import LinkDump, LinkEventSocket, parse_link_message
from kvmeter.agent.linktable import LinkEvent, LinkRecord, LinkTable
from kvmeter.agent.model import CounterKey, LinkPlacement
from kvmeter.agent.traffic import TrafficRules

log = logging.getLogger(__name__)
_NAME = attrgetter("name")
_IFINDEX = attrgetter("ifindex")


Listener = Callable[["LinkEvent"], None]
# After a read that found link messages, the event thread waits this long before it reads
# again: a storm's messages are then read dozens per wakeup instead of one or two, and each
# wakeup costs the thread about 0.1 ms of CPU on a virtual machine (its CPU in a storm round of
# 200 taps: 210-270 ms reading at once, 84-88 ms after 20 ms, 50-64 ms after 0.1 s). Later
# messages of a burst are stamped up to this much later (a tap's last bytes: 1% of a 10-s
# poll); the socket's 4 MB queue holds far more than 0.1 s of a storm.
GATHER_S = 0.1
# A read that found this many messages reads on at once: the burst fills the queue faster than
# a gather would drain it, and an overrun loses deletions' final counters
GATHER_BELOW = 256


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

    def address(self, ifname: str, ifindex: int) -> str | None:
        with self._lock:
            return self._table.address(ifname, ifindex)

    def addresses(self, keys: Sequence[CounterKey]) -> list[str | None]:
        """`address` of each key's link (a storm's reborn taps), under one hold of the lock."""
        with self._lock:
            return list(map(self._table.address, map(_NAME, keys), map(_IFINDEX, keys)))

    def links(self) -> dict[str, int]:
        """Name -> ifindex of every current link (the table's copy, the same object until a
        link changes: not to be changed by the reader)."""
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
                # (the table's records as they stand before the read: this thread alone changes them)
                received = self._socket.receive(self._table.record_at)
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
            elif 0 < received.read < GATHER_BELOW:
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
