"""The agent's poll loop: counters -> deltas -> batch -> spool (fsync) -> publish.

Everything happens on one thread, the poll thread; the topology's link events arrive on its own
thread and are handed over through a queue, stamped with the time they were received. The delta
engine stays pure: the agent reads the clocks and passes the times in. What one poll reads and
concludes is kvmeter.agent.measuring; whose each counter is, kept from poll to poll,
kvmeter.agent.ownership; this module the poll's batches, the spool, the publisher and the loop.

Order within one poll, chosen so a VM reboot (tap deleted and recreated between polls) is
counted exactly once: read the link map, read the counter table, read the link map again (a name
whose ifindex changed in between is left for the next poll); then apply the queued link events
(RTM_NEWLINK marks an identity as born while running, RTM_DELLINK's final counters close the old
incarnation), then the poll's readings.
"""

from __future__ import annotations

import logging
import platform
import queue
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from itertools import chain
from typing import Any, Callable

from kvmeter.agent.config import AgentConfig
from kvmeter.agent.counters import KernelTable, read_link_mac
from kvmeter.agent.delta import DeltaConfig, DeltaEngine
from kvmeter.agent.gc_pace import paused_collector, tune_collector
from kvmeter.agent.heap import Heap
from kvmeter.agent.inventory_fit import fitted_record
from kvmeter.agent.inventory_records import InventoryRecords
from kvmeter.agent.measures import (
    Attribution,
    Templates,
    add_measures,
    batch_header,
)
from kvmeter.agent.measuring import Measuring, StampedEvent, to_ms
from kvmeter.agent.metered import MeteredLinks
from kvmeter.agent.metrics import AgentMetrics
from kvmeter.agent.model import CounterKey, Delta
from kvmeter.agent.nic_placement import NicPlacements
from kvmeter.agent.ownership import InventoryLike, TopologyLike
from kvmeter.agent.plan import Planner, PollPlan
from kvmeter.agent.publish import Publisher
from kvmeter.agent.sources import CounterSource, nic_sources
from kvmeter.agent.spool import Spool
from kvmeter.agent.traffic import TrafficRules
from kvmeter.agent.unmetered import UnmeteredNics
from kvmeter.agent.wire import split_fields
from kvmeter.proto import pb
from kvmeter.reload import Reloads

log = logging.getLogger(__name__)

STATE_VERSION = 1
# seconds: the longest wait inside the Kafka client while deliveries are due (the loop then
# looks at stop_event and a SIGHUP's reload at least this often; an idle wait ends on either)
SERVICE_WAIT = 1.0


def _alone(part: bytes) -> list[bytes]:
    return [part]


class _StopEvent(threading.Event):
    """Agent.stop_event: setting it (a signal handler, another thread) also ends the run loop's
    wait between polls."""

    def __init__(self, wake: threading.Event) -> None:
        super().__init__()
        self._wake = wake

    def set(self) -> None:
        super().set()
        self._wake.set()


class Agent(Measuring):
    """One agent incarnation: a new stream id, sequence numbers from 1."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        inventory: InventoryLike,
        topology: TopologyLike,
        spool: Spool,
        boot_id: str,
        publisher: Publisher | None = None,
        metrics: AgentMetrics | None = None,
        read_text: Callable[[], str | bytes] | None = None,
        sources: Sequence[CounterSource] | None = None,
        read_mac: Callable[[str], str | None] = read_link_mac,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.inventory = inventory
        self.topology = topology
        self.spool = spool
        self.publisher = publisher
        self.metrics = metrics or AgentMetrics()
        self.boot_id = boot_id
        self._table = KernelTable(read_text)  # None: a netlink stats dump, else this text
        # Sources of NICs without a host link; default: libvirt's interfaceStats (vhost-user).
        self._sources = (
            tuple(sources) if sources is not None else nic_sources(inventory, config.libvirt_call_timeout)
        )
        self._links = MeteredLinks(boot_id, read_mac, self._claimed)
        self._nic_placements = NicPlacements(lambda: self.config.traffic)
        self._unmetered = UnmeteredNics(self._source_of)
        self._planner = Planner(
            self._links, topology.placement, self._sources, self._source_of, self._nic_placements
        )
        self._wall = wall
        self._mono = mono
        self.stream_id = uuid.uuid4().hex
        self.seq = 0
        self.last_measures = 0  # in the last batch
        saved = spool.last_state() or {}
        engine_state = saved.get("engine") if saved.get("v") == STATE_VERSION else None
        delta_config = DeltaConfig(line_rate_ceiling_bps=config.line_rate_ceiling_bps)
        self.engine = DeltaEngine.from_state(boot_id, engine_state, delta_config)
        self.resumed = engine_state is not None and engine_state.get("boot_id") == boot_id
        self._events: queue.SimpleQueue[StampedEvent] = queue.SimpleQueue()  # C-level get: a storm's hundreds
        self._carry: list[StampedEvent] = []  # events of a poll that failed: applied by the next one
        self._attribution: dict[CounterKey, Attribution] = {}
        self._handover, self._retired, self._waiting = {}, {}, {}
        self._incarnations = {}
        self._committed_state: dict[str, Any] | None = None
        self._templates = Templates()
        self._gone: dict[str, CounterKey] = {}  # name -> key of the links this poll's events deleted
        self._moved = []  # this poll's deltas of links up to their move off a bridge (Measuring)
        self._plan: PollPlan | None = None
        self._inventory_records = InventoryRecords()
        self._inventory_plan: PollPlan | None = None  # the plan the records were last updated for
        self._last_encoder = None
        self._reattributed = set()
        self._inventory_sent: int | None = None
        self._inventory_touched: set[str] | None = None
        self._polls_since_inventory = 0
        # What ends the loop's wait between polls: a wakeup only to look whether to stop costs
        # CPU on every hypervisor (about 0.15 ms each here), so it waits for the next poll
        self._wake = threading.Event()
        self.stop_event = _StopEvent(self._wake)
        self.reloads = Reloads()  # asked for by SIGHUP (which then calls wake()), run between two polls
        self.heap = Heap()  # the C heap: kept from poll to poll, trimmed now and then

    # -- wiring --------------------------------------------------------------------------------

    def start(self) -> None:
        self.topology.add_listener(self._on_link_event)
        self.topology.start()
        self.inventory.start()
        log.info(
            "agent started (Python %s): host %s, boot %s, stream %s, %s",
            platform.python_version(),
            self.config.host_id,
            self.boot_id,
            self.stream_id,
            "resuming saved counters" if self.resumed else "fresh start (present interfaces are baselined)",
        )
        self.heap.keep()
        self.heap.release()  # what the link dump and the inventory's first read left behind
        tune_collector()

    def wake(self) -> None:
        """End the run loop's wait between polls now (a reload asked for runs then)."""
        self._wake.set()

    def close(self) -> None:
        for part in (self.inventory, self.topology):
            try:
                part.stop()
            except Exception:
                log.exception("stopping %r failed", part)
        self._table.close()
        self.spool.close()

    def set_traffic_rules(self, rules: TrafficRules) -> None:
        """New traffic rules (a reload): interfaces are classified again from the next poll on;
        counters, spool and stream go on as they were."""
        self.config = replace(self.config, traffic=rules)
        self.topology.set_rules(rules)
        self._plan = None

    def _on_link_event(self, event: Any) -> None:
        # Topology thread: stamp and hand over; no engine access here.
        self._events.put(StampedEvent.of(event, to_ms(self._wall()), to_ms(self._mono())))
        self.metrics.link_events.labels(event.kind).inc()

    # -- one poll ------------------------------------------------------------------------------

    def poll_once(self, *, final: bool = False, dry_run: bool = False) -> pb.MeasureBatch:
        """`poll`, and what it spooled decoded as one batch (for `--once` and tests; a poll that
        went out as several batches is merged: all measures, the last batch's sequence number)."""
        merged = pb.MeasureBatch()
        for data in self.poll(final=final, dry_run=dry_run):
            merged.MergeFromString(data)
        return merged

    def poll(self, *, final: bool = False, dry_run: bool = False) -> list[bytes]:
        """Read, compute, spool (unless dry_run) and hand to the publisher. Returns the poll's
        batches as wire bytes: one, or several consecutive ones when it is bigger than
        kafka.max_batch_bytes."""
        batches = self._poll_timed(final=final, dry_run=dry_run)
        if self.publisher is not None and not dry_run:
            self.publisher.pump()
        return batches

    def poll_and_publish(self) -> None:
        """`poll` for the loop: the batches are not held while the publisher hands them over,
        so each is freed once the producer has its copy (a poll's worth of bytes less at the
        peak of a big poll)."""
        self._poll_timed(final=False, dry_run=False)
        if self.publisher is not None:
            self.publisher.pump()

    def _poll_timed(self, *, final: bool, dry_run: bool) -> list[bytes]:
        started = time.perf_counter()
        saved_engine = self._committed_state or self.engine.to_state()
        events = self._carry + self._drain()
        self._carry = []
        try:
            batches = self._poll(events, final=final, dry_run=dry_run)
        except BaseException:
            # Nothing of this poll reached the disk: undo it, so no byte is lost or counted twice.
            self.engine = DeltaEngine.from_state(self.boot_id, saved_engine, self.engine.config)
            self._committed_state = saved_engine
            self._carry = events
            self.metrics.poll_errors.inc()
            raise
        self.metrics.poll_seconds.observe(time.perf_counter() - started)
        self.metrics.polls.inc()
        return batches

    def _drain(self) -> list[StampedEvent]:
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def _poll(self, events: list[StampedEvent], *, final: bool, dry_run: bool) -> list[bytes]:
        plan, now_ms, steady, deltas = self._measure(events, final=final)
        first_seq = self.seq + 1
        header_bytes = len(self._header(first_seq, now_ms, final=final).SerializeToString())
        room = self.config.batch_bytes - header_bytes - 16  # for records in one batch
        totals: dict[str, list[int]] = {}
        steady_parts: Iterable[list[bytes]] = ()
        row_parts: list[bytes] = []
        self.last_measures = 0
        if steady is not None and plan.encoder is not None:
            steady_parts, self.last_measures, totals = plan.encoder.encode_parts(steady, room)
        del steady  # the encoder's parts hold what they need of it
        if deltas or self._moved:  # a poll by rows, or the counters a mixed poll took by rows
            measures = pb.MeasureBatch()
            for delta, who in self._moved:  # links moved off a bridge: their bytes until then
                add_measures(measures.measures, (delta,), {delta.key: who}, None, totals)
            unattributed = add_measures(measures.measures, deltas, self._attribution, self._templates, totals)
            row_parts = split_fields(measures.SerializeToString(), room)
            self.last_measures += len(measures.measures)
            for d in unattributed:
                if d.rx_bytes or d.tx_bytes:
                    log.debug("not a VM NIC, ignored: %s (%d/%d bytes)", d.key.name, d.rx_bytes, d.tx_bytes)
        inventory, inventory_sent = self._inventory_if_due(plan)
        # The inventory first, so a collector knows the domains before their measures.
        inventory_parts = split_fields(inventory, room) if inventory else []
        if inventory_parts and max(map(len, inventory_parts)) > room:
            # a record larger than a batch may be (a domain's <metadata>, its tags): trimmed, so
            # no batch of the stream is one the producer or the broker refuses for ever
            inventory_parts = [p if len(p) <= room else fitted_record(p, room) for p in inventory_parts]
        parts = chain(map(_alone, inventory_parts), steady_parts, map(_alone, row_parts))
        batches = self._batches(parts, first_seq, now_ms, final=final)
        last = len(batches) - 1
        if last:
            log.debug("poll of %d measures goes out as %d batches", self.last_measures, len(batches))
        if dry_run:
            return batches
        engine_state = self.engine.to_state()
        state = {"v": STATE_VERSION, "engine": engine_state}
        self.spool.append_poll(self.stream_id, first_seq, batches, state, now_ms)
        self.seq = first_seq + last
        self._committed_state = engine_state  # the rollback point of the next poll
        self._inventory_spooled(inventory_sent)
        self._count(deltas, totals)
        self._handed_over()
        self._forget_closed(plan)
        return batches

    def _batches(
        self, parts: Iterable[list[bytes]], first_seq: int, now_ms: int, *, final: bool
    ) -> list[bytes]:
        """Each part (as runs of records) joined behind its header as it comes, so a big poll's
        records are never held twice; only the last batch may be `final` (the last poll's:
        its header is written again)."""
        batches = [self._batch(first_seq + i, now_ms, part) for i, part in enumerate(parts)]
        if not batches:
            return [self._batch(first_seq, now_ms, [], final=final)]
        if final:
            seq = first_seq + len(batches) - 1
            header = self._header(seq, now_ms, final=False).SerializeToString()
            batches[-1] = self._batch(seq, now_ms, [batches[-1][len(header) :]], final=True)
        return batches

    def _batch(self, seq: int, now_ms: int, runs: list[bytes], *, final: bool = False) -> bytes:
        return b"".join([self._header(seq, now_ms, final=final).SerializeToString(), *runs])

    def _header(self, seq: int, now_ms: int, *, final: bool) -> pb.MeasureBatch:
        return batch_header(
            host_id=self.config.host_id,
            boot_id=self.boot_id,
            stream_id=self.stream_id,
            seq=seq,
            poll_ms=now_ms,
            final=final,
        )

    def _count(self, deltas: list[Delta], totals: Mapping[str, list[int]]) -> None:
        for traffic, (vm_rx, vm_tx) in totals.items():
            if vm_rx:
                self.metrics.bytes.labels(traffic, "vm_rx").inc(vm_rx)
            if vm_tx:
                self.metrics.bytes.labels(traffic, "vm_tx").inc(vm_tx)
        finals = 0
        for d in deltas:
            if d.final_at_delete:
                finals += 1
            if d.quarantine_reason is not None:
                self.metrics.quarantines.inc()
                log.warning("quarantined %s (ifindex %d): %s", d.key.name, d.key.ifindex, d.quarantine_reason)
        if finals:
            self.metrics.final_deltas.inc(finals)  # one call for a storm's hundreds

    def update_spool_metrics(self) -> None:
        self.metrics.spool_frames.set(self.spool.pending_count())
        self.metrics.spool_bytes.set(self.spool.pending_bytes())
        oldest = self.spool.oldest_pending_ms()
        self.metrics.spool_age.set(max(0.0, self._wall() - oldest / 1000) if oldest else 0.0)
        reconnects = getattr(self.inventory, "reconnects", None)
        if isinstance(reconnects, int):
            self.metrics.libvirt_reconnects.set(reconnects)

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        """Poll every poll_interval until stop_event; then one last poll, flush, return."""
        interval = self.config.poll_interval
        next_poll = self._mono()
        while True:
            self._wake.clear()  # first: a stop or a reload asked from here on ends the coming wait
            if self.stop_event.is_set():
                break
            self.reloads.run_pending()
            now = self._mono()
            if now >= next_poll:
                try:
                    paused_collector(self.poll_and_publish)
                except Exception:
                    log.exception("poll failed; retrying at the next interval")
                next_poll += interval
                if next_poll <= now:
                    next_poll = now + interval
                self.update_spool_metrics()
                self.heap.after_poll()
            wait = max(0.0, next_poll - self._mono())
            if self.publisher is not None and self.publisher.in_flight() and not self.publisher.stalled():
                self.publisher.service(min(wait, SERVICE_WAIT))  # deliveries to serve
            else:
                # Nothing handed to librdkafka (or nothing left there), or a broker that
                # delivers nothing: no need to serve it between polls (its errors and deliveries
                # are served at each poll's pump).
                self._wake.wait(wait)
        self.shutdown()

    def shutdown(self, flush_timeout: float = 10.0) -> None:
        """SIGTERM: one last poll, flush to the broker, close. Undelivered batches stay spooled."""
        try:
            self.poll(final=True)
        except Exception:
            log.exception("last poll failed")
        if self.publisher is not None:
            self.publisher.close(flush_timeout)
        self.update_spool_metrics()
        log.info(
            "agent stopped: stream %s, %d batches, %d undelivered in the spool",
            self.stream_id,
            self.seq,
            len(self.spool.pending()),
        )
