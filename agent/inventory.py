"""Which domains run here and what their NICs are, from libvirt: the agent's inventory.

The poll thread only ever reads the last published state (:meth:`Inventory.snapshot`,
:meth:`Inventory.by_device`): that never touches libvirt, so a libvirt call that hangs (they do
during migrations) stalls at most the inventory's own worker thread, never counter polling.

The worker thread connects read-only, does a full resync, then refreshes single domains when
libvirt reports lifecycle, device-added/removed or metadata-change events, and does a full
resync every ``resync_seconds`` as a safety net. A closed connection (libvirtd restart) or a
failing call on a dead connection makes it reconnect with exponential backoff (tenacity).
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from typing import Any, Callable

import libvirt
from tenacity import RetryError, Retrying, retry_if_exception_type, wait_exponential

from kvmeter.agent.bounded_calls import BoundedCalls
from kvmeter.agent.domxml import DomainXmlError, domain_info, parse_domain_xml
from kvmeter.agent.libvirt_events import DOMAIN_EVENTS, domain_state, ensure_event_loop
from kvmeter.agent.metered import INACTIVE_STATES
from kvmeter.agent.model import DomainInfo, NicInfo
from kvmeter.agent.names import DEFAULT_INSTANCE_SUFFIX
from kvmeter.agent.recent_owners import RecentOwners

log = logging.getLogger(__name__)

MAX_STATS_CALLS_IN_FLIGHT = 4  # interfaceStats calls stuck in a hung libvirt, at most

ByDevice = dict[str, tuple[DomainInfo, NicInfo]]
Opener = Callable[[str], Any]


def _alive(conn: Any) -> bool:
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:
        return False


class Inventory:
    """Domains and NICs of this host, from libvirt, kept current in the background.

    * ``Inventory(uri="qemu:///system", *, resync_seconds=300, opener=libvirt.openReadOnly,
      instance_suffix="VM")``; ``instance_suffix`` is CloudStack's ``instance.name``.
    * ``start()``: background worker (connect, full resync, then event-driven domain refreshes,
      a full resync every ``resync_seconds``, reconnect with exponential backoff after the
      connection closes or dies). ``stop()`` ends it and closes the connection.
    * ``refresh()``: a synchronous full resync on the caller's thread (``--once``, tests);
      raises ``libvirt.libvirtError`` when libvirt cannot be reached.
    * ``snapshot() -> {uuid: DomainInfo}`` and ``by_device() -> {host device: (DomainInfo,
      NicInfo)}``: the last published state, returned at once, never blocking on libvirt;
      ``last_owners(device)``: the NICs that had it while their domain ran, kept a while after.
    * ``interface_stats(uuid, device, timeout=2.0) -> (rx_bytes, rx_packets, tx_bytes,
      tx_packets) | None``: libvirt's ``interfaceStats`` for NICs the host cannot see (vhost-
      user). libvirt reports taps from the guest's point of view (it swaps them); the call runs
      on a helper thread and gives up after ``timeout`` (None), as it does on any error.
    * counters: ``reconnects`` (successful reconnections after the first connect), ``resyncs``,
      ``errors`` (domains skipped or calls failed), ``stats_timeouts``.
    """

    def __init__(
        self,
        uri: str = "qemu:///system",
        *,
        resync_seconds: float = 300,
        opener: Opener = libvirt.openReadOnly,
        instance_suffix: str = DEFAULT_INSTANCE_SUFFIX,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
    ) -> None:
        self.uri = uri
        self.resync_seconds = resync_seconds
        self.instance_suffix = instance_suffix
        self._opener = opener
        self._backoff = (backoff_initial, backoff_max)
        self._conn: Any = None
        self._callback_ids: list[int] = []
        self._state_lock = threading.Lock()
        self._domains: dict[str, DomainInfo] = {}
        self._by_device: ByDevice = {}
        self._recent = RecentOwners()  # each device's last running owner, for a while after
        self._resync_lock = threading.Lock()  # one full resync at a time (worker vs refresh())
        self._work: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._stats_calls: BoundedCalls[tuple[int, int, int, int]] = BoundedCalls(MAX_STATS_CALLS_IN_FLIGHT)
        self._connected_once = False
        self._first_sync = threading.Event()
        self.reconnects = 0
        self.resyncs = 0
        self.errors = 0

    # -- the poll thread's side: never blocks on libvirt ----------------------------------------
    def snapshot(self) -> dict[str, DomainInfo]:
        """The last known domains by UUID (a copy)."""
        with self._state_lock:
            return dict(self._domains)

    def by_device(self) -> ByDevice:
        """Host device name (target dev) -> its domain and NIC, for NICs libvirt has named."""
        with self._state_lock:
            return dict(self._by_device)

    def last_owners(self, device: str) -> list[tuple[DomainInfo, NicInfo]]:
        """The domains and NICs a device name last belonged to while they ran: the one running
        under it now (a tap deleted before the inventory heard its VM stop or its NIC unplugged;
        first: the freshest record of a domain read again), then the one seen to leave it, if
        recent: a tap made and deleted between two polls was one of theirs, told apart by its
        MAC."""
        with self._state_lock:
            owners = (self._by_device.get(device), self._recent.get(device, time.monotonic()))
        return [o for o in owners if o is not None and o[0].state not in INACTIVE_STATES]

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def interface_stats(
        self, uuid: str, device: str, timeout: float = 2.0
    ) -> tuple[int, int, int, int] | None:
        """(rx_bytes, rx_packets, tx_bytes, tx_packets) from libvirt, or None (error, timeout,
        not connected, or too many earlier calls still stuck in libvirt)."""
        conn = self._conn
        if conn is None:
            return None

        def read() -> tuple[int, int, int, int] | None:
            try:
                stats = conn.lookupByUUIDString(uuid).interfaceStats(device)
            except libvirt.libvirtError as exc:
                log.debug("interfaceStats(%s, %s) failed: %s", uuid, device, exc)
                return None
            return (int(stats[0]), int(stats[1]), int(stats[4]), int(stats[5]))

        return self._stats_calls.call(read, timeout, f"libvirt interfaceStats({uuid}, {device})")

    @property
    def stats_timeouts(self) -> int:
        return self._stats_calls.timeouts

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, wait: float = 10.0) -> None:
        """Start the worker and wait up to ``wait`` s for its first full resync, so the first
        poll already knows the domains; a libvirt that is down or hangs does not hold it longer."""
        if self._thread is not None:
            raise RuntimeError("Inventory already started")
        ensure_event_loop()
        self._stopping.clear()
        self._first_sync.clear()
        self._thread = threading.Thread(target=self._run, name="kvmeter-inventory", daemon=True)
        self._thread.start()
        if not self._first_sync.wait(wait):
            log.warning("no inventory from libvirt at %s yet; polling goes on without it", self.uri)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the worker; if it is stuck in a hung libvirt call, give up after ``timeout``."""
        self._stopping.set()
        self._work.put(("stop", None))
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("inventory worker is stuck in libvirt; leaving it behind")
            else:
                self._drop_connection()
            self._thread = None
        else:
            self._drop_connection()

    def refresh(self) -> None:
        """Full resync now, on this thread. Uses the worker's connection when there is one,
        else a connection of its own, closed afterwards."""
        conn = self._conn
        if conn is not None:
            self._resync(conn)
            return
        conn = self._opener(self.uri)
        if conn is None:  # very old bindings returned None instead of raising
            raise libvirt.libvirtError(f"cannot open {self.uri}")
        try:
            self._resync(conn)
        finally:
            conn.close()

    # -- worker --------------------------------------------------------------------------------
    def _run(self) -> None:
        next_resync = 0.0
        while not self._stopping.is_set():
            conn = self._conn
            if conn is None:
                conn = self._connect_with_backoff()
                if conn is None:
                    return
                next_resync = 0.0
            if time.monotonic() >= next_resync:
                if self._guarded(conn, functools.partial(self._resync, conn)):
                    self._first_sync.set()
                next_resync = time.monotonic() + self.resync_seconds
                continue
            try:
                # no timeout of its own: stop() queues a "stop" (an idle wakeup costs CPU)
                kind, item = self._work.get(timeout=max(0.0, next_resync - time.monotonic()))
            except queue.Empty:
                continue
            if kind == "stop":
                return
            if kind == "closed":
                if item is conn:
                    log.warning("libvirt connection to %s closed; reconnecting", self.uri)
                    self._drop_connection()
                continue
            if kind == "domain":
                uuids = {item, *self._drain_domain_work()}
                for uuid in sorted(uuids):
                    refreshed = self._guarded(conn, functools.partial(self._refresh_domain, conn, uuid))
                    if not refreshed and self._conn is not conn:
                        break  # the connection died: the resync after reconnecting reads every domain

    def _drain_domain_work(self) -> list[str]:
        """More queued domain refreshes (an event storm refreshes each domain once)."""
        uuids: list[str] = []
        while True:
            try:
                kind, item = self._work.get_nowait()
            except queue.Empty:
                return uuids
            if kind == "domain":
                uuids.append(item)
            else:
                self._work.put((kind, item))
                return uuids

    def _guarded(self, conn: Any, work: Callable[[], None]) -> bool:
        """Run ``work``; on a libvirt error, drop the connection if it is dead. True if it worked."""
        try:
            work()
            return True
        except libvirt.libvirtError as exc:
            self.errors += 1
            alive = False
            try:
                alive = bool(conn.isAlive())
            except libvirt.libvirtError:
                pass
            if alive:
                log.warning("libvirt call failed: %s", exc)
            else:
                log.warning("libvirt connection to %s lost (%s); reconnecting", self.uri, exc)
                self._drop_connection()
            return False

    # -- connection ----------------------------------------------------------------------------
    def _connect_with_backoff(self) -> Any:
        initial, maximum = self._backoff
        retrying = Retrying(
            retry=retry_if_exception_type(libvirt.libvirtError),
            wait=wait_exponential(multiplier=initial, min=initial, max=maximum),
            stop=lambda _state: self._stopping.is_set(),
            sleep=self._sleep,
            before_sleep=lambda state: log.warning(
                "cannot connect to libvirt at %s (attempt %d): %s",
                self.uri,
                state.attempt_number,
                state.outcome.exception() if state.outcome else "?",
            ),
        )
        try:
            return retrying(self._connect)
        except RetryError:
            return None  # stopping

    def _sleep(self, seconds: float) -> None:
        self._stopping.wait(seconds)  # stop() cuts a backoff short

    def _connect(self) -> Any:
        conn = self._opener(self.uri)
        if conn is None:  # very old bindings returned None instead of raising
            raise libvirt.libvirtError(f"cannot open {self.uri}")
        try:
            self._register(conn)
        except libvirt.libvirtError:
            conn.close()
            raise
        self._conn = conn
        if self._connected_once:
            self.reconnects += 1
            log.info("reconnected to libvirt at %s", self.uri)
        self._connected_once = True
        return conn

    def _register(self, conn: Any) -> None:
        conn.registerCloseCallback(lambda c, reason, _opaque: self._work.put(("closed", c)), None)
        for name in DOMAIN_EVENTS:
            event_id = getattr(libvirt, name, None)
            if event_id is None:
                continue
            try:
                self._callback_ids.append(
                    conn.domainEventRegisterAny(None, event_id, self._on_domain_event, None)
                )
            except libvirt.libvirtError as exc:
                log.info("libvirt at %s does not report %s: %s", self.uri, name, exc)

    def _on_domain_event(self, _conn: Any, dom: Any, *_rest: Any) -> None:
        # libvirt's event thread: no libvirt calls here (UUIDString is local), just queue work.
        self._work.put(("domain", dom.UUIDString()))

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        callback_ids, self._callback_ids = self._callback_ids, []
        if conn is None:
            return
        for callback_id in callback_ids:
            try:
                conn.domainEventDeregisterAny(callback_id)
            except libvirt.libvirtError:
                pass
        try:
            conn.unregisterCloseCallback()
        except libvirt.libvirtError:
            pass
        try:
            conn.close()
        except libvirt.libvirtError:
            pass

    # -- reading domains -----------------------------------------------------------------------
    def _resync(self, conn: Any) -> None:
        with self._resync_lock:
            domains: dict[str, DomainInfo] = {}
            with self._state_lock:
                known = self._domains
            for dom in conn.listAllDomains(0):
                try:
                    info = self._read_domain(dom)
                except libvirt.libvirtError as exc:
                    if not _alive(conn):
                        raise
                    # one domain's call failed (a timeout): it keeps what was known of it, the
                    # others are read on
                    self.errors += 1
                    uuid = dom.UUIDString().lower()
                    log.warning("reading domain %s failed, keeping what was known of it: %s", uuid, exc)
                    info = known.get(uuid)
                if info is not None:
                    domains[info.uuid] = info
            self._publish(domains)
            self.resyncs += 1

    def _refresh_domain(self, conn: Any, uuid: str) -> None:
        with self._resync_lock:
            try:
                dom = conn.lookupByUUIDString(uuid)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
                dom = None
            info = self._read_domain(dom) if dom is not None else None
            with self._state_lock:
                domains = dict(self._domains)
            if info is None:
                domains.pop(uuid.lower(), None)  # gone (a stopped transient domain)
            else:
                domains[info.uuid] = info
            self._publish(domains)

    def _read_domain(self, dom: Any) -> DomainInfo | None:
        """One domain's DomainInfo; None if it vanished meanwhile or its XML is unusable."""
        try:
            xml = dom.XMLDesc(0)
            state = domain_state(dom.state()[0])
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise
        try:
            parsed = parse_domain_xml(xml)
        except DomainXmlError as exc:
            self.errors += 1
            log.error("skipping a domain whose XML cannot be read: %s", exc)
            return None
        return domain_info(parsed, state, self.instance_suffix)

    def _publish(self, domains: dict[str, DomainInfo]) -> None:
        # A domain read again unchanged (a periodic resync) keeps its object: the poll loop keeps
        # what it derived from the domains (plan, encoder, inventory records) while the objects
        # are the same.
        with self._state_lock:
            known = self._domains
        for uuid, info in domains.items():
            old = known.get(uuid)
            if old is not None and old is not info and old == info:
                domains[uuid] = old
        by_device: ByDevice = {}
        for info in domains.values():
            for nic in info.nics:
                if nic.device:
                    by_device[nic.device] = (info, nic)
        with self._state_lock:
            self._recent.left(self._domains, domains, time.monotonic())
            self._domains = domains
            self._by_device = by_device
