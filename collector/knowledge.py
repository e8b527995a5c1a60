"""Lifecycle knowledge, shared through the store: other replicas' events count too. Events
committed since the last sync (by anyone; paged in commit order, store/sequence.py) are learned
into the histories and the owner index.

    sync() -> changed resources        # a page at a time, letting closed resources go between pages
    _stored_since(skip) / _learn(events, built, seen_through=...)

LifecycleKnowledge is the base of service.Collector's layers (knowledge -> attributing ->
parked_path -> measures_path -> events_path -> service), whose state it declares.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Mapping

from kvmeter.collector import lifecycle
from kvmeter.collector.attribution import OwnerIndex
from kvmeter.collector.inventory_memory import InventoryMemory
from kvmeter.collector.model import ResourceHistory, Settings
from kvmeter.collector.resident import ResidentHistories
from kvmeter.collector.store import Store
from kvmeter.proto import pb

SYNC_PAGE = 10_000  # stored events read per query when catching up with the store
# A history and the events (by id) it was built from.
Built = tuple[Mapping[str, pb.LifecycleEvent], ResourceHistory | None]
_NOT_BUILT: Built = ({}, None)


class LifecycleKnowledge(ResidentHistories, InventoryMemory):
    store: Store
    settings: Settings
    clock: Callable[[], int]
    index: OwnerIndex
    histories: dict[str, ResourceHistory]
    _events: dict[str, dict[str, pb.LifecycleEvent]]
    _last_event_seq: int
    _knowledge: int  # bumps whenever the owner index changes

    def sync(self) -> set[str]:
        """Load events stored since the last sync (by anyone) into histories and the index; a
        page at a time, letting closed resources go between pages (a replica starting on years
        of events never holds them all)."""
        changed: set[str] = set()
        self.store.number_stragglers()  # an older replica's events, in a rolling upgrade
        while True:
            seen = self._last_event_seq
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
            rows = self.store.events_since(conn, self._last_event_seq, SYNC_PAGE)
        learned: list[pb.LifecycleEvent] = []
        for seq, resource, normalized, event_id in rows:
            self._last_event_seq = seq
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
        by itself or not, without waiting for the sync (which pages by commit order and reaches
        it too). A history in `built` (from the same events, by id) is taken as it is instead of
        being built again. A resource out of memory comes back whole first (one built here is
        whole already; else one with an event committed by seq `seen_through` was seen here
        before).
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
