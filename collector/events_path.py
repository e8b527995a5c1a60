"""Lifecycle events: parse -> store the new ones -> rebuild each touched resource's history once
from all its stored events -> their time-based records for every window up to now (same
transaction, a few statements per chunk) -> attribute parked measures they explain.

    apply_events(records) -> Outcome
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from sqlalchemy.engine import Connection

from kvmeter.collector import cloudstack, lifecycle, usage
from kvmeter.collector.errors import BadInput
from kvmeter.collector.isolation import isolating
from kvmeter.collector.knowledge import Built
from kvmeter.collector.measures_path import MeasuresPath
from kvmeter.collector.model import LATE_LIFECYCLE, DeadLetter, Outcome, Record, UsageKey
from kvmeter.collector.retention import window_floor
from kvmeter.proto import pb

LIFECYCLE = "lifecycle"


class EventsPath(MeasuresPath):
    def apply_event(self, value: bytes, key: bytes | None = None, origin: str = "") -> Outcome:
        return self.apply_events([Record(value, key, origin)])

    def apply_events(
        self, records: Sequence[Record], *, within: Callable[[Connection], None] | None = None
    ) -> Outcome:
        """Store new events and recompute the resources they touch, in one transaction (with
        what `within` writes, idempotently: the input's own rows about these records)."""
        return isolating(
            self.store, self.clock, LIFECYCLE, records, lambda chunk: self._apply_events(chunk, within)
        )

    def _apply_events(
        self, records: Sequence[Record], within: Callable[[Connection], None] | None = None
    ) -> Outcome:
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
        # Kept here and in the store. An event delivered twice in one chunk keeps its first place
        # in its source's order, as across chunks: the clock-skew rule reads that place.
        read: dict[str, pb.LifecycleEvent] = {}
        for ev, _ in parsed:
            read.setdefault(ev.event_id, lifecycle.as_read(ev))
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
            if within is not None:
                within(conn)
        mine = [read[ev.event_id] for ev, _ in parsed if ev.resource_uuid]
        seen = self._last_event_seq
        self._learn([*self._stored_since(skip={ev.event_id for ev in mine}), *mine], built, seen_through=seen)
        out.add(self._unpark_for(touched))
        return out

    def _recompute(
        self,
        conn: Connection,
        resources: Sequence[str],
        final_through: int,
        now: int,
        out: Outcome,
        reason: str = LATE_LIFECYCLE,
    ) -> dict[str, Built]:
        """Rebuild each resource from all its stored events and rewrite its time-based records
        (one read of the events and one write of the records for all of them); `reason` is that
        of the adjustments of final windows. Returns the histories with the ids of the events
        they were built from."""
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
            conn, values, final_through, now, floors=floors, reason=reason
        )
        return built


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
