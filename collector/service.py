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

Collector is a stack of layers, one concept per module, each building on the ones before:
resident.py and inventory_memory.py (what memory holds), knowledge.py (syncing lifecycle from
the store), attributing.py (measures to owners), parked_path.py (parked measures),
measures_path.py (apply_batches), events_path.py (apply_events), isolation.py (input the
database refuses); this module holds the state and the clock-driven tick.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from sqlalchemy.engine import Connection

from kvmeter.collector import lifecycle, residency, usage
from kvmeter.collector.aggregate import Route
from kvmeter.collector.attribution import OwnerIndex
from kvmeter.collector.decode import Target
from kvmeter.collector.events_path import LIFECYCLE, EventsPath
from kvmeter.collector.isolation import UNSTORABLE
from kvmeter.collector.knowledge import Built
from kvmeter.collector.measures_path import MEASURES
from kvmeter.collector.model import POLICY_CHANGE, Outcome, ResourceHistory, Settings
from kvmeter.collector.policy import BillingPolicy
from kvmeter.collector.public_vlans import Placements
from kvmeter.collector.recent import Recent
from kvmeter.collector.reconcile import Witness
from kvmeter.collector.store import Store
from kvmeter.collector.windows import check_window, window_start
from kvmeter.proto import pb

FULL_RETRY_MS = 5 * 60_000
EVICT_EVERY_MS = 60_000  # how often tick looks for resources to let go of
NOT_STORED_ROTATE_MS = 3_600_000  # how long a uuid found without events is remembered so

__all__ = ["LIFECYCLE", "MEASURES", "UNSTORABLE", "Collector"]


class Collector(EventsPath):
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
        self._ticked_ms: int | None = None  # the clock at the last tick that grew every window
        self._last_event_seq = 0
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
        self.placements = Placements()

    def set_routers(self, routers: Mapping[str, str]) -> None:
        """The operator's router -> account map, re-read (SIGHUP): measures attributed from now
        on use it, and parked measures are retried against it at the next full retry."""
        self.settings = dataclasses.replace(self.settings, routers=dict(routers))
        self.index.routers = dict(routers)
        self._knowledge += 1  # drops the cached routes, so every target is looked up again

    def set_policy(self, policy: BillingPolicy, per_pass: int = 200) -> Outcome:
        """Put another billing policy in force (SIGHUP) and recompute every resource with stored
        events under it, from all its events: open windows rewritten, final windows adjusted by
        the difference. So the store follows one policy, the new one, as a rebuild under it
        would (in adjustments where windows were final). Unchanged: nothing."""
        if policy == self.settings.policy:
            return Outcome()
        before = self.settings
        self.settings = dataclasses.replace(self.settings, policy=policy)
        try:
            return self.recompute_all(per_pass)
        except BaseException:
            # Cut short: not in force, so the reload asked again recomputes (idempotent) and records it.
            self.settings = before
            raise

    def recompute_all(self, per_pass: int = 200) -> Outcome:
        """Every resource with stored events recomputed under the policy in force (set_policy),
        a page of resources per transaction."""
        out = Outcome()
        after = ""
        while True:
            with self.store.read() as conn:
                page = [row[0] for row in self.store.event_resources(conn, after, per_pass)]
            if not page:
                break
            after, now, part = page[-1], self.clock(), Outcome()
            with self.store.write() as conn:
                final_through = self.store.finalized_through(conn)
                self.store.lock_resources(conn, page)
                # A final window that differs now does because of the policy, not of late events.
                built = self._recompute(conn, page, final_through, now, part, POLICY_CHANGE)
            out.add(part)
            # Out of memory (closed under the policy before) and open under this one: back, or no
            # tick grows the windows it now bills (residency.py).
            self.restore([r for r in page if r not in self._events and _reopened(built.get(r))])
            for resource in page:  # those in memory: their histories under the new policy
                if resource in self._events:
                    whole, history = built.get(resource, ({}, None))
                    if history is None or whole.keys() != self._events[resource].keys():
                        history = lifecycle.build_resource_history(
                            resource, self._events[resource].values(), self.settings.policy
                        )
                    self.histories[resource] = history
                    self.index.update(history)
        self._knowledge += 1
        return out

    def tick(self, *, finalize_through: int | None = None) -> Outcome:
        """Grow open windows, finalize those past the grace period, retry parked measures.
        finalize_through: finalize no window ending after it (a rebuild: the live store's
        watermark, so that windows the live store never finalized are finalized, and handed
        off, by the collector put in service on the new store)."""
        out = Outcome()
        self.sync()
        now = self.clock()
        window = self.settings.window_ms
        # Open segments, and those closed after the last tick's clock: a closing event stamped
        # after the clock when it was applied (a management server's clock ahead) was counted up
        # to then only, and is grown to its stamp here.
        ticked = self._ticked_ms
        if ticked is None:  # the first tick: any segment that may end in a window still open
            with self.store.read() as conn:
                ticked = self.store.finalized_through(conn, lock=False)
        running = sorted(
            uuid
            for uuid, h in self.histories.items()
            if any(s.end_ms is None or s.end_ms > ticked for s in (*h.running, *h.allocated, *h.ip))
        )
        for start in range(0, len(running), 200):
            chunk = running[start : start + 200]
            with self.store.write() as conn:
                final_through = self.store.finalized_through(conn)
                self.store.lock_resources(conn, chunk)
                # Another replica may have stored events of these resources since the sync above
                # (and written their records): learn them under the lock, else the values below
                # come from a stale history and overwrite the right ones.
                self._learn_stored(conn, chunk)
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
        self._ticked_ms = now
        through = window_start(now - self.settings.grace_ms, window)
        if finalize_through is not None:
            through = min(through, finalize_through)
        with self.store.read() as conn:
            # Replicas share the database's clock: one whose own clock runs ahead must not make
            # final (and hand off) windows still in their grace, or the hour under way.
            shared = self.store.database_ms(conn)
            if shared is not None:
                through = min(through, window_start(shared - self.settings.grace_ms, window))
            closing = through > self.store.finalized_through(conn, lock=False)
        if closing:
            # A stopped VM's bytes waited for its events while their window was open: billed
            # now by the history as it is (attribution.py). One parked by another replica
            # between this and the finalization is billed by a later pass (no longer doubted).
            out.add(self._unpark(closing=through))
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

    def _learn_stored(self, conn: Connection, resources: list[str]) -> None:
        """Learn the events of these resources stored (by anyone) and not known here."""
        stored = self.store.event_ids_of_many(conn, resources)
        behind = [r for r in resources if stored.get(r, set()) - self._events.get(r, {}).keys()]
        if not behind:
            return
        raw = self.store.events_of_many(conn, behind)
        self._learn(
            pb.LifecycleEvent.FromString(event) for resource in behind for event in raw.get(resource, [])
        )

    @property
    def events(self) -> Mapping[str, Mapping[str, pb.LifecycleEvent]]:
        """The lifecycle events known here, by resource and event id (read-only)."""
        return self._events

    def horizon_start(self) -> int:
        """Parked measures parked before this instant are reported as unattributed."""
        return self.clock() - self.settings.park_horizon_ms


def _reopened(built: Built | None) -> bool:
    """A history recomputed with a segment still open."""
    history = None if built is None else built[1]
    return history is not None and any(
        s.end_ms is None for s in (*history.running, *history.allocated, *history.ip)
    )
