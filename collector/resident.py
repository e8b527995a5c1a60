"""The I/O half of bounded memory (the pure half, what may leave and what brings it back, is
residency.py): the collector's resources leave memory and come back from the store.

    ._evict(now) -> int              # closed resources past the cutoff leave memory
    .restore(resources, conn=None)   # evicted ones back, rebuilt from all their stored events
    ._restore_for(conn, batches)     # those the batches' attribution may read
    .resident -> int                 # how many are held

ResidentHistories is a mixin of service.Collector, whose state it works on (annotated below).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from sqlalchemy.engine import Connection

from kvmeter.collector import decode, lifecycle, residency
from kvmeter.collector.attribution import OwnerIndex
from kvmeter.collector.model import ResourceHistory, Settings
from kvmeter.collector.store import Store
from kvmeter.proto import pb

log = logging.getLogger(__name__)


class ResidentHistories:
    store: Store
    settings: Settings
    index: OwnerIndex
    histories: dict[str, ResourceHistory]
    _events: dict[str, dict[str, pb.LifecycleEvent]]
    evicted: residency.Evicted

    def _evict(self, now: int) -> int:
        """Let resources whose lifecycle closed before the cutoff leave memory (residency.py);
        returns how many left. Nothing is written: the store already holds all they were."""
        keep = self.settings.evict_after_ms
        if keep is None or not self.histories:
            return 0
        cutoff = now - max(keep, self.settings.grace_ms)
        gone = []
        for uuid, history in self.histories.items():
            if residency.last_end(history) is None and (history.running or history.allocated or history.ip):
                continue  # open: the common case, decided without looking at the events
            last = max((ev.time for ev in self._events.get(uuid, {}).values()), default=0)
            if residency.evictable(history, last, cutoff):
                gone.append(uuid)
        for uuid in gone:
            history = self.histories.pop(uuid)
            self._events.pop(uuid, None)
            self.index.remove(uuid)
            self.evicted.add(history)
        if gone:
            log.debug("%d resource(s) left memory, %d held", len(gone), len(self.histories))
        return len(gone)

    def restore(self, resources: Iterable[str], conn: Connection | None = None) -> set[str]:
        """Bring evicted resources back from the store, rebuilt from all their events (on
        `conn` when given, else on a read of its own); returns those brought back."""
        back = self._load_events(conn, resources)
        for uuid, history in sorted(back.items()):
            self.histories[uuid] = history
            self.index.update(history)
        return set(back)

    def _load_events(self, conn: Connection | None, resources: Iterable[str]) -> dict[str, ResourceHistory]:
        """The evicted ones among `resources`: their events back in memory, and their histories
        built from them (not yet in the index)."""
        wanted = sorted({r for r in resources if r in self.evicted})
        if not wanted:
            return {}
        if conn is None:
            with self.store.read() as own:
                stored = self.store.events_of_many(own, wanted)
        else:
            stored = self.store.events_of_many(conn, wanted)
        back = {}
        for uuid in wanted:
            events = [pb.LifecycleEvent.FromString(raw) for raw in stored.get(uuid, [])]
            self._events[uuid] = {ev.event_id: ev for ev in events}
            back[uuid] = lifecycle.build_resource_history(uuid, events, self.settings.policy)
            self.evicted.discard(back[uuid])
        return back

    def _restore_for(self, conn: Connection, batches: Sequence[decode.DecodedBatch]) -> None:
        """Bring back the evicted resources the batches' attribution may read."""
        if not self.evicted:
            return
        wanted: set[str] = set()
        uuids = self.evicted.uuids
        for batch in batches:
            wanted.update(t.instance_uuid for t in set(batch.targets) if t.instance_uuid in uuids)
            if batch.starts and min(batch.starts) < self.evicted.watermark:
                for i, start in enumerate(batch.starts):
                    t = batch.targets[i]
                    mac = batch.message.measures[i].mac if batch.message is not None else ""
                    wanted |= self.evicted.wanted(t.instance_uuid, mac, t.address, start)
        self.restore(wanted, conn)

    @property
    def resident(self) -> int:
        """How many resources' histories are held in memory."""
        return len(self.histories)
