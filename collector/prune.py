"""Pruning by the retention policy: `kvmeter prune [--dry-run]` and the collector's periodic job.

One pass walks the kinds (retention.KINDS) oldest rows first, a bounded page at a time, each page
deleted in its own short transaction: at most `batch_rows` rows (a resource's lifecycle events go
all together, so one resource with more events than that is a page of its own). A dry run walks
the same pages and deletes nothing: its counts are what a real pass would delete now. Where a
kind depends on one pruned before it (parked measures keep a resource's events, events keep their
corrections), the dry pass counts what it has counted as deleted already as gone (_Dry).

On PostgreSQL one replica prunes at a time: a pass holds a session advisory lock on a connection
of its own and gives way when another holds it (the job skips its turn; the command says so).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from kvmeter.collector import lifecycle
from kvmeter.collector.metrics import Metrics
from kvmeter.collector.policy import DEFAULT_POLICY, BillingPolicy
from kvmeter.collector.retention import KINDS, TABLES, RetentionPolicy, closed_through
from kvmeter.collector.store import Store
from kvmeter.collector.store.pruning import old_rows
from kvmeter.proto import pb

log = logging.getLogger(__name__)

PRUNE_LOCK = 7346215  # pg advisory lock key of a pruning pass (migrations hold 7346201)
RESOURCES_PER_READ = 1000


class Busy(RuntimeError):
    """Another replica (or command) is pruning this store now."""


@dataclass
class _Dry:
    """What a dry pass counted as deleted that a later kind depends on (a real pass deleted it
    by then): the same selections then see what a real pass sees."""

    cutoffs: dict[str, int]
    parked: Any = None  # a condition on parked_measures: those counted (no longer keep events)
    events: Any = None  # a condition on lifecycle_events: unresourced ones counted
    corrections: int = 0  # old corrections of the resources whose events were counted


class Pruner:
    def __init__(
        self,
        store: Store,
        policy: RetentionPolicy,
        clock: Callable[[], int],
        billing: BillingPolicy | Callable[[], BillingPolicy] = DEFAULT_POLICY,
    ):
        self.store = store
        self.policy = policy
        self.clock = clock
        # Histories are built as the collector builds them: under the [policy] in force, which
        # a SIGHUP may change (a callable: the collector's own), else an open history is pruned.
        self.billing = billing if callable(billing) else (lambda: billing)
        self._dry: _Dry | None = None  # the pass under way is a dry one

    def run(self, *, dry_run: bool = False) -> dict[str, int]:
        """One pass; {table kind: rows deleted (or, dry, that would be)} for every kind with an
        age. Raises Busy when another pass holds the store."""
        with self._exclusive():
            now = self.clock()
            counts: dict[str, int] = {}
            cutoffs = self.policy.cutoffs(now)
            self._dry = _Dry(cutoffs) if dry_run else None
            for kind, cutoff in cutoffs.items():
                for name in TABLES[kind]:
                    counts[name] = 0
                self._prune(kind, cutoff, now, counts, dry_run=dry_run)
            return counts

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        if not self.store.is_postgres:  # SQLite: one writer at a time anyway, pages interleave
            yield
            return
        # A session lock, held across the pass's transactions (each on a connection of its own).
        with self.store.engine.connect() as conn:
            with conn.begin():
                got = conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": PRUNE_LOCK}).scalar()
            if not got:
                raise Busy("another pruning pass holds this store")
            try:
                yield
            finally:
                with conn.begin():
                    conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": PRUNE_LOCK})

    def _prune(self, kind: str, cutoff: int, now: int, counts: dict[str, int], *, dry_run: bool) -> None:
        dry = self._dry
        if kind == "lifecycle_events":
            counts["lifecycle_events"] += self._rows("unresourced_events", cutoff, dry_run=dry_run)
            if dry is not None:
                dry.events = old_rows("unresourced_events", cutoff)[2]
            counts["lifecycle_events"] += self._events(cutoff, now, dry_run=dry_run)
        elif kind == "corrections":  # those whose event is gone: a dry pass adds its events' own
            events_gone = None if dry is None else dry.events
            counts[kind] += self._rows(kind, cutoff, dry_run=dry_run, events_gone=events_gone)
            counts[kind] += 0 if dry is None else dry.corrections
        elif kind == "usage":
            with self.store.read() as conn:
                through = min(cutoff, self.store.finalized_through(conn, lock=False))
            if not dry_run:  # first: a recompute from now on leaves these windows alone
                with self.store.write() as conn:
                    self.store.raise_usage_pruned_through(conn, through)
            for name in TABLES["usage"]:
                counts[name] += self._rows(name, cutoff, dry_run=dry_run, usage_through=through)
        elif kind == "stream_marks":
            counts["stream_marks"] += self._rows(kind, cutoff, dry_run=dry_run, gaps=counts)
        elif kind == "outbox_sent":
            counts["handoff_outbox"] += self._rows(kind, cutoff, dry_run=dry_run)
        else:
            counts[kind] += self._rows(kind, cutoff, dry_run=dry_run)
            if kind == "parked_measures" and dry is not None:
                dry.parked = old_rows(kind, cutoff)[2]

    def _rows(
        self,
        kind: str,
        cutoff: int,
        *,
        dry_run: bool,
        usage_through: int = 0,
        gaps: dict[str, int] | None = None,
        events_gone: Any = None,
    ) -> int:
        """Rows of a kind pruned row by row, a page per transaction; returns how many."""
        limit, after, total = self.policy.batch_rows, _FIRST[kind], 0
        while True:
            with self.store.read() if dry_run else self.store.write() as conn:
                keys: list[Any] = self.store.old_keys(
                    conn,
                    kind,
                    cutoff,
                    after,
                    limit,
                    lock=not dry_run,
                    usage_through=usage_through,
                    events_gone=events_gone,
                )
                if not keys:
                    return total
                if gaps is not None:
                    gaps["stream_gaps"] += (
                        self.store.gaps_count(conn, keys)
                        if dry_run
                        else self.store.delete_keys(conn, kind, keys)
                    )
                elif not dry_run:
                    self.store.delete_keys(conn, kind, keys)
            after, total = keys[-1], total + len(keys)
            if len(keys) < limit:
                return total

    def _events(self, cutoff: int, now: int, *, dry_run: bool) -> int:
        """Lifecycle events of closed, old histories no parked measure still needs: whole
        resources, pages of at most batch_rows events (or one resource)."""
        after, total = "", 0
        while True:
            with self.store.read() as conn:
                page = self.store.event_resources(conn, after, RESOURCES_PER_READ)
                if not page:
                    return total
                after = page[-1][0]
                old = {r: (n, t) for r, n, t, received in page if t < cutoff and received < cutoff}
                through = self._closed(conn, old, min(cutoff, self.store.finalized_through(conn, lock=False)))
            seen = {r: old[r] for r in through}
            for group in _groups(seen, self.policy.batch_rows):
                if dry_run:
                    total += sum(seen[r][0] for r in group)
                    dry = self._dry
                    if dry is not None and "corrections" in dry.cutoffs:  # a real pass deletes them next
                        with self.store.read() as conn:
                            dry.corrections += self.store.corrections_of_resources(
                                conn, group, dry.cutoffs["corrections"]
                            )
                    continue
                with self.store.write() as conn:
                    pruned = self.store.prune_resources(conn, {r: seen[r] for r in group}, through, now)
                total += sum(pruned.values())

    def _closed(self, conn: Any, old: dict[str, tuple[int, int]], final: int) -> dict[str, int]:
        """{resource: the instant its pruned history speaks of last} of those whose history is
        closed by `final` and whose identities no parked measure carries."""
        stored = self.store.events_of_many(conn, old)
        closed: dict[str, int] = {}
        histories = {}
        billing = self.billing()
        for resource, raws in stored.items():
            history = lifecycle.build_resource_history(
                resource, [pb.LifecycleEvent.FromString(r) for r in raws], billing
            )
            end = closed_through(history)
            if end is not None and end <= final:
                closed[resource] = max(end, old[resource][1])
                histories[resource] = history
        instances, macs, addresses = self.store.parked_carrying(
            conn,
            closed,
            [m for h in histories.values() for m in h.macs],
            [a for h in histories.values() for a in (*h.addresses, *(s.address for s in h.ip))],
            gone=None if self._dry is None else self._dry.parked,  # a real pass deleted those
        )
        return {
            r: t
            for r, t in closed.items()
            if r not in instances
            and not macs.intersection(histories[r].macs)
            and not addresses.intersection([*histories[r].addresses, *(s.address for s in histories[r].ip)])
        }


_FIRST: dict[str, Any] = {
    "corrections": "",
    "domain_witness": "",
    "stream_marks": "",
}
_FIRST = {kind: _FIRST.get(kind, 0) for kind in (*KINDS, "unresourced_events", *TABLES["usage"])}


def _groups(seen: dict[str, tuple[int, int]], rows: int) -> Iterator[list[str]]:
    """Resources in pages of at most `rows` events (a bigger resource alone)."""
    group: list[str] = []
    size = 0
    for resource in sorted(seen):
        n = seen[resource][0]
        if group and size + n > rows:
            yield group
            group, size = [], 0
        group.append(resource)
        size += n
    if group:
        yield group


class PruneJob:
    """The collector's periodic pass, on a thread of its own: short transactions beside the
    ingesting loop, never in it."""

    def __init__(self, pruner: Pruner, interval_s: float, metrics: Metrics):
        self.pruner = pruner
        self.interval_s = interval_s
        self.metrics = metrics
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="prune", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread.is_alive():
            self.thread.join(timeout=30)

    def _loop(self) -> None:
        while not self.stop_event.wait(self.interval_s):
            self.run_once()

    def run_once(self) -> dict[str, int]:
        try:
            counts = self.pruner.run()
        except Busy:
            log.info("prune: another replica is pruning; next turn in %.0fs", self.interval_s)
            return {}
        except Exception:
            self.metrics.errors.labels("prune").inc()
            log.exception("prune: pass failed; next turn in %.0fs", self.interval_s)
            return {}
        self.metrics.record_pruned(counts)
        if any(counts.values()):
            log.info("prune: %s", ", ".join(f"{k} {v}" for k, v in counts.items() if v))
        return counts
