"""The collector's orchestration: the pure core composed with the store, one code path for the
live consumer and for batch ingest. The clock is injected (ms since the epoch).

    apply_batches(records)   measures: decode -> drop what the stream mark says is applied ->
                             attribute -> byte increments / park / quarantine, all of it and the
                             new marks in ONE transaction (exactly-once effect).
    apply_events(records)    lifecycle: parse -> store the new ones -> rebuild each touched
                             resource's history once from all its stored events -> their time-based
                             records for every window up to now (same transaction, a few statements
                             per chunk) -> attribute parked measures they explain.
    tick()                   grow open time-based windows, finalize windows past the grace period,
                             retry parked measures when ownership knowledge changed, report
                             measures parked past the horizon as UNATTRIBUTED usage (they stay
                             parked; a later owner takes the bytes over from UNATTRIBUTED), let
                             resources closed long ago leave memory (residency.py).
    restore(resources)       bring evicted resources back from the store (before reading them).

A change to a final window is an adjustment row (store), never a rewrite. Bad input is
dead-lettered with its bytes and the rest goes on.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Container, Iterable, Mapping, Sequence

from sqlalchemy.engine import Connection
from sqlalchemy.exc import DataError, IntegrityError

from kvmeter.collector import cloudstack, decode, lifecycle, residency, usage
from kvmeter.collector.aggregate import Attributed, Route, Tally
from kvmeter.collector.attribution import OwnerIndex
from kvmeter.collector.decode import Target
from kvmeter.collector.errors import BadInput
from kvmeter.collector.inventory_memory import InventoryMemory
from kvmeter.collector.model import (
    UNATTRIBUTED,
    DeadLetter,
    Measure,
    Outcome,
    Record,
    ResourceHistory,
    Settings,
    UsageKey,
)
from kvmeter.collector.pruned_measures import pruned_letters
from kvmeter.collector.recent import Recent
from kvmeter.collector.reconcile import Witness
from kvmeter.collector.resident import ResidentHistories
from kvmeter.collector.retention import window_floor
from kvmeter.collector.store import Store, reconciliation
from kvmeter.collector.streams import admit, irregular
from kvmeter.collector.windows import check_window, window_start
from kvmeter.proto import pb

log = logging.getLogger(__name__)

MEASURES = "measures"
LIFECYCLE = "lifecycle"
FULL_RETRY_MS = 5 * 60_000
SYNC_PAGE = 10_000  # stored events read per query when catching up with the store
EVICT_EVERY_MS = 60_000  # how often tick looks for resources to let go of
ROUTES_KEPT = 250_000  # decoded Targets whose route is kept between chunks (decode keeps 200,000)
UNSTORABLE = "unstorable"  # dead-letter reason: the database refused the record's values
NOT_STORED_ROTATE_MS = 3_600_000  # how long a uuid found without events is remembered so
# A history and the events (by id) it was built from.
Built = tuple[Mapping[str, pb.LifecycleEvent], ResourceHistory | None]
_NOT_BUILT: Built = ({}, None)


class Collector(ResidentHistories, InventoryMemory):
    def __init__(self, store: Store, settings: Settings, clock: Callable[[], int]):
        check_window(settings.window_ms)
        self.store = store
        self.settings = settings
        self.clock = clock
        self.index = OwnerIndex(routers=settings.routers)
        self.histories: dict[str, ResourceHistory] = {}
        self._events: dict[str, dict[str, pb.LifecycleEvent]] = {}
        self.evicted = residency.Evicted()  # resources out of memory, reloaded when read
        self._not_stored: Recent[str, bool] = Recent()
        self._not_stored_ms = -(2**62)  # when it last rotated
        self._evicted_ms = -(2**62)  # when tick last looked for some
        self._last_event_row = 0
        self._knowledge = 0  # bumps whenever the owner index changes
        # Tally routes by decoded Target, kept while the histories stay the same (_knowledge).
        self._routes: dict[Target, Route | None] = {}
        self._routes_at = -1
        self._retried_at = -1  # knowledge level of the last full retry of parked measures
        self._retried_ms = -(2**62)  # and when it ran
        # Owner fields of CloudStack's <metadata> per domain uuid and name, as the agents last
        # reported them; batches carry the inventory only now and then (store: owner_hints).
        # Those of domains met lately (inventory_memory.py).
        self.hints: Recent[str, dict[str, str]] = Recent()
        self.index.hints = self.hints
        # The agents' view of each domain's state (running or not, since when), from the
        # inventories; the reconciler's second witness (store: domain_witness, on changes).
        self.witness: Recent[str, Witness] = Recent()
        self._no_hint: Recent[str, bool] = Recent()
        self._no_witness: Recent[str, bool] = Recent()
        self._inventory_ms = -(2**62)

    def set_routers(self, routers: Mapping[str, str]) -> None:
        """The operator's router -> account map, re-read (SIGHUP): measures attributed from now
        on use it, and parked measures are retried against it at the next full retry."""
        self.settings = dataclasses.replace(self.settings, routers=dict(routers))
        self.index.routers = dict(routers)
        self._knowledge += 1  # drops the cached routes, so every target is looked up again

    # -- lifecycle knowledge (shared through the store: other replicas' events count too) -----
    def sync(self) -> set[str]:
        """Load events stored since the last sync (by anyone) into histories and the index; a
        page at a time, letting closed resources go between pages (a replica starting on years
        of events never holds them all)."""
        changed: set[str] = set()
        while True:
            seen = self._last_event_row
            learned, more = self._page_since()
            changed |= self._learn(learned, seen_through=seen)
            if not more:
                return changed
            self._evict(self.clock())

    def _stored_since(self, skip: Container[str] = ()) -> list[pb.LifecycleEvent]:
        """Events stored since the last sync (by anyone) and not known here, nor in `skip`."""
        learned: list[pb.LifecycleEvent] = []
        more = True
        while more:
            page, more = self._page_since(skip)
            learned.extend(page)
        return learned

    def _page_since(self, skip: Container[str] = ()) -> tuple[list[pb.LifecycleEvent], bool]:
        """One page of _stored_since, and whether there may be more."""
        with self.store.read() as conn:
            rows = self.store.events_since(conn, self._last_event_row, SYNC_PAGE)
        learned: list[pb.LifecycleEvent] = []
        for row_id, resource, normalized, event_id in rows:
            self._last_event_row = row_id
            if resource and event_id not in skip and event_id not in self._events.get(resource, ()):
                learned.append(pb.LifecycleEvent.FromString(normalized))
        return learned, len(rows) == SYNC_PAGE

    def _learn(
        self,
        events: Iterable[pb.LifecycleEvent],
        built: Mapping[str, Built] | None = None,
        *,
        seen_through: int | None = None,
    ) -> set[str]:
        """Add events to the in-memory histories and owner index; returns resources changed.

        Every replica reads the whole lifecycle topic and learns each event it parses, stored
        by itself or not: on PostgreSQL, ids of concurrent inserts can commit out of order, so
        the sync cursor alone could step over one. A history in `built` (from the same events,
        by id) is taken as it is instead of being built again. A resource out of memory comes
        back whole first (one built here is whole already; else one with an event stored by row
        `seen_through` was seen here before).
        """
        events = list(events)
        built = built or {}
        others = {ev.resource_uuid for ev in events if ev.resource_uuid not in built}
        changed = set(self._load_events(None, others, seen_through=seen_through))
        for resource, (whole, history) in built.items():
            if history is not None and resource not in self.histories:
                if whole.keys() - {ev.event_id for ev in events if ev.resource_uuid == resource}:
                    self.evicted.discard()  # it had events before these: it had left memory
                self._events[resource] = dict(whole)
                changed.add(resource)
        for ev in events:
            known = self._events.setdefault(ev.resource_uuid, {})
            if ev.event_id not in known:
                known[ev.event_id] = ev
                changed.add(ev.resource_uuid)
        for resource in changed:
            whole, history = built.get(resource, _NOT_BUILT)
            if history is None or whole.keys() != self._events[resource].keys():
                history = lifecycle.build_resource_history(
                    resource, self._events[resource].values(), self.settings.policy
                )
            self.histories[resource] = history
            self.index.update(history)
        if changed:
            self._knowledge += 1
        return changed

    # -- measures -----------------------------------------------------------------------------
    def apply_batch(self, value: bytes, origin: str = "") -> Outcome:
        return self.apply_batches([Record(value, None, origin)])

    def apply_batches(self, records: Sequence[Record]) -> Outcome:
        """Apply measure batches in one transaction; returns what happened."""
        return self._isolating(MEASURES, records, self._apply_batches)

    def _isolating(
        self, source: str, records: Sequence[Record], apply: Callable[[Sequence[Record]], Outcome]
    ) -> Outcome:
        """Input the database itself refuses (a value too long for PostgreSQL, ...) must not
        stop the pipeline: apply the chunk record by record and dead-letter the refused one."""
        try:
            return apply(records)
        except (DataError, IntegrityError) as exc:
            if len(records) > 1:
                out = Outcome()
                for rec in records:
                    out.add(self._isolating(source, [rec], apply))
                return out
            rec = records[0]
            letter = DeadLetter(
                source, rec.origin, rec.value, UNSTORABLE, str(exc.orig or exc)[:1000], rec.key
            )
            with self.store.write() as conn:
                self.store.dead_letter(conn, [letter], self.clock())
            return Outcome(dead_letters=[letter])

    def _apply_batches(self, records: Sequence[Record]) -> Outcome:
        out = Outcome()
        decoded: list[decode.DecodedBatch] = []
        origins: dict[tuple[str, int], str] = {}
        for rec in records:
            try:
                decoded.append(decode.decode_batch(rec.value))
                origins[decoded[-1].stream_id, decoded[-1].seq] = rec.origin
            except BadInput as exc:
                out.dead_letters.append(DeadLetter(MEASURES, rec.origin, rec.value, exc.reason, exc.message))
        self.sync()
        now = self.clock()
        streams = {b.stream_id: b.host_id for b in decoded}
        decoded.sort(key=lambda b: (b.stream_id, b.seq))
        with self.store.read() as conn:
            self._recall(conn, decoded)
        learned = self._learn_hints(decoded)
        witnessed = self._witness_changes(decoded)
        with self.store.write() as conn:
            reconciliation.save_witness(conn, witnessed)
            if learned:
                self.store.save_owner_hints(conn, learned, now)
            final_through = self.store.finalized_through(conn)
            marks = self.store.lock_marks(conn, streams)
            gaps = self.store.gaps_of(conn, irregular(decoded, marks))
            admitted, new_marks, changed_gaps, out.duplicates = admit(decoded, marks, gaps)
            out.batches = len(admitted)
            self._restore_for(conn, admitted)
            done = self._attribute((), out, batches=admitted)
            out.records, out.adjustments = self._write(conn, done, final_through, now)
            self.store.park(conn, self._park_or_letter(conn, done.parked, origins, out), now)
            self.store.quarantine(conn, done.quarantined, now)
            self.store.dead_letter(conn, out.dead_letters, now)
            self.store.set_marks(conn, new_marks, now)
            self.store.set_gaps(conn, changed_gaps)
        if learned:  # measures parked for want of these owners (by uuid; a bare name: all)
            named_only = any(not dom.uuid for b in decoded for dom in b.inventory if dom.name in learned)
            out.add(self._unpark() if named_only else self._unpark(instances=sorted(learned)))
        return out

    def _park_or_letter(
        self, conn: Connection, parked: list[Measure], origins: Mapping[tuple[str, int], str], out: Outcome
    ) -> list[Measure]:
        """The measures to park; those of a pruned resource's past are dead letters (pruned_measures)."""
        if not parked:
            return parked
        tombstones = self.store.tombstones(conn, {m.instance_uuid for m in parked if m.instance_uuid})
        if not tombstones:
            return parked
        keep, letters, nbytes = pruned_letters(parked, tombstones, origins)
        out.parked -= len(parked) - len(keep)
        out.dead_letters.extend(letters)
        out.pruned_bytes += nbytes
        return keep

    def _attribute(
        self,
        measures: Iterable[Measure],
        out: Outcome,
        owner_at: Callable[[Measure], str | None] | None = None,
        *,
        batches: Iterable[decode.DecodedBatch] = (),
    ) -> Attributed:
        """In memory: byte increments summed per record key; measures to park / quarantine
        (aggregate.Tally). By the owner index unless `owner_at` says otherwise."""
        window, billable = self.settings.window_ms, self.settings.billable
        if owner_at is None:
            if self._routes_at != self._knowledge or len(self._routes) > ROUTES_KEPT:
                self._routes, self._routes_at = {}, self._knowledge
            tally = Tally(window, billable, self.index.owner_at, self.index.history, self._routes)
        else:
            tally = Tally(window, billable, owner_at)
        for batch in batches:
            tally.add_batch(batch)
        for m in measures:
            tally.add(m)
        result = tally.result()
        out.measures += result.measures
        out.billed_bytes += result.billed_bytes
        out.parked += len(result.parked)
        out.quarantined += len(result.quarantined)
        return result

    def _write(
        self, conn: Connection, done: Attributed, final_through: int, now: int, reason: str = "late bytes"
    ) -> tuple[int, int]:
        self.store.add_unbilled(conn, done.unbilled, now)
        return self.store.add_bytes(conn, done.billed, done.names, final_through, now, reason=reason)

    # -- lifecycle ----------------------------------------------------------------------------
    def apply_event(self, value: bytes, key: bytes | None = None, origin: str = "") -> Outcome:
        return self.apply_events([Record(value, key, origin)])

    def apply_events(self, records: Sequence[Record]) -> Outcome:
        """Store new events and recompute the resources they touch, in one transaction."""
        return self._isolating(LIFECYCLE, records, self._apply_events)

    def _apply_events(self, records: Sequence[Record]) -> Outcome:
        out = Outcome()
        parsed: list[tuple[pb.LifecycleEvent, Record]] = []
        limit = self.settings.max_event_bytes
        for rec in records:
            try:
                parsed.append((_delivered(cloudstack.parse_event(rec.value, rec.key, limit), rec), rec))
            except BadInput as exc:
                out.dead_letters.append(
                    DeadLetter(LIFECYCLE, rec.origin, rec.value, exc.reason, exc.message, rec.key)
                )
        # One insert order for every replica: concurrent chunks never wait on each other in a cycle.
        parsed.sort(key=lambda item: item[0].event_id)
        read = {ev.event_id: lifecycle.as_read(ev) for ev, _ in parsed}  # kept here and in the store
        now = self.clock()
        with self.store.write() as conn:
            final_through = self.store.finalized_through(conn)
            parsed, past = _after_pruning(
                parsed, self.store.tombstones(conn, {ev.resource_uuid for ev, _ in parsed})
            )
            # The payload once (raw, and the key where it adds to it); of the event, what histories read.
            rows = [
                (
                    ev.event_id,
                    ev.resource_uuid,
                    ev.time,
                    rec.value,
                    read[ev.event_id].SerializeToString(deterministic=True),
                    cloudstack.key_to_keep(rec.key, ev),
                )
                for ev, rec in parsed
            ]
            new = self.store.insert_events(conn, rows, now)
            out.events, out.known_events = len(new), len(parsed) - len(new) + past
            touched = sorted(
                {ev.resource_uuid for ev, _ in parsed if ev.resource_uuid and ev.event_id in new}
            )
            self.store.lock_resources(conn, touched)
            built = self._recompute(conn, touched, final_through, now, out)
            self.store.dead_letter(conn, out.dead_letters, now)
        mine = [read[ev.event_id] for ev, _ in parsed if ev.resource_uuid]
        seen = self._last_event_row
        self._learn([*self._stored_since(skip={ev.event_id for ev in mine}), *mine], built, seen_through=seen)
        out.add(self._unpark_for(touched))
        return out

    def _recompute(
        self, conn: Connection, resources: Sequence[str], final_through: int, now: int, out: Outcome
    ) -> dict[str, Built]:
        """Rebuild each resource from all its stored events and rewrite its time-based records
        (one read of the events and one write of the records for all of them). Returns the
        histories with the ids of the events they were built from."""
        stored = self.store.events_of_many(conn, resources)
        # Retention: of a resource whose events were pruned, the windows they spoke of stay as billed.
        pruned = self.store.tombstones(conn, resources)
        floors = dict.fromkeys(resources, self.store.usage_pruned_through(conn))
        values: dict[str, dict[UsageKey, int]] = {}
        built: dict[str, Built] = {}
        for resource in resources:
            events = [pb.LifecycleEvent.FromString(raw) for raw in stored.get(resource, [])]
            if resource in pruned:
                events = [ev for ev in events if ev.time > pruned[resource]]
                floors[resource] = max(
                    floors[resource], window_floor(pruned[resource], self.settings.window_ms)
                )
            history = lifecycle.build_resource_history(resource, events, self.settings.policy)
            built[resource] = ({ev.event_id: ev for ev in events}, history)
            values[resource] = {
                v.key: v.quantity_ms for v in usage.time_usage(history, now, self.settings.window_ms)
            }
        out.records, out.adjustments = self.store.set_time_values_many(
            conn, values, final_through, now, floors=floors
        )
        return built

    def _unpark_for(self, resources: Sequence[str], per_pass: int = 500) -> Outcome:
        """Bill parked measures of these resources (by instance, MAC or address) now that their
        lifecycle is known."""
        out = Outcome()
        known = [r for r in resources if r in self.histories]
        for start in range(0, len(known), per_pass):
            instances, macs, addresses = [], [], []
            for resource in known[start : start + per_pass]:
                history = self.histories[resource]
                instances.append(resource)
                macs.extend(history.macs)
                addresses.extend([*history.addresses, *(seg.address for seg in history.ip if seg.address)])
            out.add(self._unpark(instances=instances, macs=macs, addresses=addresses))
        return out

    def _unpark(
        self, *, instances: Iterable[str] = (), macs: Iterable[str] = (), addresses: Iterable[str] = ()
    ) -> Outcome:
        """Bill parked measures that now have an owner: delete from parked and add the bytes in
        one transaction (a parked row is locked, so two replicas bill it once)."""
        out = Outcome()
        after = 0
        while True:
            now = self.clock()
            with self.store.write() as conn:
                final_through = self.store.finalized_through(conn)
                rows = self.store.take_parked(
                    conn, instances=instances, macs=macs, addresses=addresses, after_id=after
                )
                if not rows:
                    break
                after = rows[-1][0]
                self._restore_measures(conn, (m for _, m, _ in rows))
                owned = [(row_id, m, told) for row_id, m, told in rows if self.index.owner_at(m) is not None]
                if owned:
                    part = Outcome()
                    done = self._attribute((m for _, m, _ in owned), part)
                    # Bytes already reported as unattributed move to their owner.
                    moved = self._attribute((m for _, m, told in owned if told), Outcome(), _unattributed)
                    for mine, theirs in ((done.billed, moved.billed), (done.unbilled, moved.unbilled)):
                        for key, amount in theirs.items():
                            mine[key] = mine.get(key, 0) - amount
                    self.store.delete_parked(conn, [row_id for row_id, _, _ in owned])
                    written, adjusted = self._write(conn, done, final_through, now, "late attribution")
                    out.unparked += len(owned)
                    out.billed_bytes += part.billed_bytes
                    out.records += written
                    out.adjustments += adjusted
        return out

    def _report_unattributed(self) -> Outcome:
        """Parked past the horizon: add the bytes to usage under UNATTRIBUTED (never a guessed
        owner); the measures stay parked and move to their owner if one is ever known."""
        out = Outcome()
        while True:
            now = self.clock()
            with self.store.write() as conn:
                final_through = self.store.finalized_through(conn)
                rows = self.store.take_unreported(conn, now - self.settings.park_horizon_ms)
                if not rows:
                    break
                done = self._attribute((m for _, m in rows), Outcome(), _unattributed)
                written, adjusted = self._write(conn, done, final_through, now, "unattributed")
                self.store.mark_reported(conn, [row_id for row_id, _ in rows], now)
                out.unattributed += len(rows)
                out.records += written
                out.adjustments += adjusted
        return out

    # -- time ---------------------------------------------------------------------------------
    def tick(self) -> Outcome:
        """Grow open windows, finalize those past the grace period, retry parked measures."""
        out = Outcome()
        self.sync()
        now = self.clock()
        window = self.settings.window_ms
        running = sorted(
            uuid
            for uuid, h in self.histories.items()
            if any(s.end_ms is None for s in (*h.running, *h.allocated, *h.ip))
        )
        for start in range(0, len(running), 200):
            chunk = running[start : start + 200]
            with self.store.write() as conn:
                final_through = self.store.finalized_through(conn)
                self.store.lock_resources(conn, chunk)
                # Only windows still open: time alone changes nothing final.
                values = {
                    resource: {
                        v.key: v.quantity_ms
                        for v in usage.time_usage(
                            self.histories[resource], now, window, since_ms=final_through
                        )
                    }
                    for resource in chunk
                }
                written, adjusted = self.store.set_time_values_many(
                    conn, values, final_through, now, open_only=True
                )
                out.records += written
                out.adjustments += adjusted
        through = window_start(now - self.settings.grace_ms, window)
        with self.store.write() as conn:
            out.finalized = self.store.finalize(conn, through, now)
        # Events retry the measures they explain at once; this full pass catches the rest (a
        # measure parked by another replica meanwhile), at most every FULL_RETRY_MS.
        if self._retried_at != self._knowledge and now - self._retried_ms >= FULL_RETRY_MS:
            self._retried_at, self._retried_ms = self._knowledge, now
            out.add(self._unpark())
        out.add(self._report_unattributed())
        if now - self._evicted_ms >= EVICT_EVERY_MS:
            self._evicted_ms = now
            self._evict(now)
        if now - self._not_stored_ms >= NOT_STORED_ROTATE_MS:
            self._not_stored_ms = now
            self._not_stored.rotate()
            self._forget_absent()
        self._forget_inventory(now)
        return out

    @property
    def events(self) -> Mapping[str, Mapping[str, pb.LifecycleEvent]]:
        """The lifecycle events known here, by resource and event id (read-only)."""
        return self._events

    def horizon_start(self) -> int:
        """Parked measures parked before this instant are reported as unattributed."""
        return self.clock() - self.settings.park_horizon_ms


def _delivered(ev: pb.LifecycleEvent, rec: Record) -> pb.LifecycleEvent:
    """The event with its place in its source's delivery order (the clock-skew rule's input)."""
    if rec.order is not None:
        ev.delivery_source, ev.delivery_seq = rec.order
    return ev


def _after_pruning(
    parsed: list[tuple[pb.LifecycleEvent, Record]], pruned: Mapping[str, int]
) -> tuple[list[tuple[pb.LifecycleEvent, Record]], int]:
    """The events not of a pruned past (stamped after their resource's tombstone), and how many
    were: those are known, and neither stored nor learned (a replayed old event reopens nothing)."""
    kept = [
        (ev, rec)
        for ev, rec in parsed
        if ev.resource_uuid not in pruned or ev.time > pruned[ev.resource_uuid]
    ]
    return kept, len(parsed) - len(kept)


def _unattributed(_measure: Measure) -> str:
    return UNATTRIBUTED
