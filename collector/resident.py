"""The I/O half of bounded memory (the pure half, what may leave and what brings it back, is
residency.py): the collector's resources leave memory and come back from the store.

    ._evict(now) -> int              # closed resources past the cutoff leave memory
    .restore(resources, conn=None)   # those out of memory back, rebuilt from all their stored events
    ._restore_for(conn, batches)     # those the batches' attribution may read
    ._restore_measures(conn, ms)     # those these measures' attribution may read
    .resident -> int                 # how many are held

Out of memory, a resource is found again through the store: by uuid, its stored events (a uuid
with stored events that is not in memory left it, once the replica has synced); by MAC or
address, schema_residency.evicted_keys, read only for measures starting before the latest end
of an evicted resource. Uuids found to have no events are remembered a while (Recent), so the
measures of a domain lifecycle never named (a router, a VM whose events are late) do not ask
the store each chunk.

ResidentHistories is a mixin of service.Collector, whose state it works on (annotated below).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from sqlalchemy.engine import Connection

from kvmeter.collector import decode, lifecycle, residency
from kvmeter.collector.attribution import OwnerIndex
from kvmeter.collector.model import Measure, ResourceHistory, Settings
from kvmeter.collector.recent import Recent
from kvmeter.collector.store import Store
from kvmeter.collector.store import evicted as evicted_store
from kvmeter.proto import pb

log = logging.getLogger(__name__)


class ResidentHistories:
    store: Store
    settings: Settings
    index: OwnerIndex
    histories: dict[str, ResourceHistory]
    _events: dict[str, dict[str, pb.LifecycleEvent]]
    _last_event_seq: int
    evicted: residency.Evicted
    _not_stored: Recent[str, bool]  # uuids with no stored event when last looked at

    def _evict(self, now: int) -> int:
        """Let resources whose lifecycle closed before the cutoff leave memory (residency.py);
        returns how many left. Their keys are written first: the store holds all else they were."""
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
        if not gone:
            return 0
        rows = [row for uuid in gone for row in residency.Evicted().add(self.histories[uuid])]
        with self.store.write() as conn:
            evicted_store.save_evicted_keys(conn, rows)
        for uuid in gone:
            history = self.histories.pop(uuid)
            self._events.pop(uuid, None)
            self.index.remove(uuid)
            self.evicted.add(history)
            self._not_stored.pop(uuid, None)
        log.debug("%d resource(s) left memory, %d held", len(gone), len(self.histories))
        return len(gone)

    def restore(self, resources: Iterable[str], conn: Connection | None = None) -> set[str]:
        """Bring resources out of memory back from the store, rebuilt from all their events (on
        `conn` when given, else on a read of its own); returns those brought back."""
        back = self._load_events(conn, resources)
        for uuid, history in sorted(back.items()):
            self.histories[uuid] = history
            self.index.update(history)
        return set(back)

    def _load_events(
        self, conn: Connection | None, resources: Iterable[str], *, seen_through: int | None = None
    ) -> dict[str, ResourceHistory]:
        """Those of `resources` not in memory that have stored events (and, with `seen_through`,
        a first event at or before that seq: seen here before); their events back in memory,
        and their histories built from them (not yet in the index)."""
        if not self.evicted.ever:
            return {}
        wanted = {r for r in resources if r and r not in self.histories and r not in self._not_stored}
        if not wanted:
            return {}
        if conn is None:
            with self.store.read() as own:
                return self._load_events(own, wanted, seen_through=seen_through)
        first = evicted_store.first_event_rows(conn, wanted)
        for uuid in wanted - first.keys():
            self._not_stored[uuid] = True
        found = sorted(u for u, seq in first.items() if seen_through is None or seq <= seen_through)
        if not found:
            return {}
        stored = self.store.events_of_many(conn, found)
        back = {}
        for uuid in found:
            events = [pb.LifecycleEvent.FromString(raw) for raw in stored.get(uuid, [])]
            self._events[uuid] = {ev.event_id: ev for ev in events}
            back[uuid] = lifecycle.build_resource_history(uuid, events, self.settings.policy)
            self.evicted.discard()
        return back

    def _restore_for(self, conn: Connection, batches: Sequence[decode.DecodedBatch]) -> None:
        """Bring back the resources out of memory the batches' attribution may read."""
        if not self.evicted.ever:
            return  # nothing left memory: nothing to look for
        uuids = {t.instance_uuid for b in batches for t in set(b.targets)}
        starts: dict[str, int] = {}
        for batch in batches:
            if batch.starts and min(batch.starts) < self.evicted.watermark:
                for i, start in enumerate(batch.starts):
                    t = batch.targets[i]
                    mac = batch.message.measures[i].mac if batch.message is not None else ""
                    _earliest(starts, start, mac.lower(), t.address)
        self._restore_wanted(conn, uuids, starts)

    def _restore_measures(self, conn: Connection, measures: Iterable[Measure]) -> None:
        """Bring back the resources out of memory these measures' attribution may read."""
        uuids: set[str] = set()
        starts: dict[str, int] = {}
        for m in measures:
            uuids.add(m.instance_uuid)
            if m.start_ms < self.evicted.watermark:
                _earliest(starts, m.start_ms, m.mac.lower(), m.address)
        self._restore_wanted(conn, uuids, starts)

    def _restore_wanted(self, conn: Connection, uuids: set[str], starts: dict[str, int]) -> None:
        if not self.evicted.ever:
            return
        holders = (
            residency.holders_wanted(evicted_store.evicted_holders(conn, starts), starts) if starts else set()
        )
        self.restore(uuids | holders, conn)

    @property
    def resident(self) -> int:
        """How many resources' histories are held in memory."""
        return len(self.histories)


def _earliest(starts: dict[str, int], start: int, *keys: str) -> None:
    for key in keys:
        if key and start < starts.get(key, 2**62):
            starts[key] = start
