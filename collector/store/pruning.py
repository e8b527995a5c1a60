"""Retention's statements: old rows selected a bounded page at a time and deleted by key, each
page in its own short transaction (store/engine.py's write), so ingestion never waits long.

Selections read the finalized watermark without its lock (it only grows): a pass never holds
up the finalizer. Rows other replicas hold (a parked measure being attributed, a stream mark
being raised) are skipped on PostgreSQL (`FOR UPDATE SKIP LOCKED`) and left to the next pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from kvmeter.collector.schema import (
    KEY_COLUMNS,
    collector_state,
    corrections,
    dead_letters,
    domain_witness,
    handoff_outbox,
    lifecycle_events,
    parked_measures,
    quarantined_measures,
    stream_gaps,
    stream_marks,
    unbilled_bytes,
    usage_adjustments,
    usage_records,
)
from kvmeter.collector.schema_credits import credits
from kvmeter.collector.schema_retention import USAGE_PRUNED_THROUGH, pruned_resources
from kvmeter.collector.store import versions
from kvmeter.collector.store.engine import slices
from kvmeter.collector.store.evicted import delete_evicted_keys
from kvmeter.collector.store.usage import UsageWrites


def old_rows(
    kind: str, cutoff: int, usage_through: int = 0, events_gone: Any = None
) -> tuple[sa.Table, Any, Any]:
    """(table, key column, condition) of a kind pruned row by row: rows older than `cutoff`
    (usage: of windows ending by `usage_through`, final ones only). events_gone: a condition on
    lifecycle_events of events counted as deleted already (a dry pass: they are still there)."""
    pm, qm, dl = parked_measures.c, quarantined_measures.c, dead_letters.c
    ev, corr, w = lifecycle_events.c, corrections.c, domain_witness.c
    if kind == "parked_measures":  # reported as unattributed: their bytes are in usage already
        return parked_measures, pm.id, sa.and_(pm.reported_ms.is_not(None), pm.reported_ms < cutoff)
    if kind == "quarantined_measures":
        return quarantined_measures, qm.id, qm.created_ms < cutoff
    if kind == "dead_letters_resolved":
        return dead_letters, dl.id, sa.and_(dl.resolved_ms.is_not(None), dl.resolved_ms < cutoff)
    if kind == "dead_letters_open":
        return dead_letters, dl.id, sa.and_(dl.resolved_ms.is_(None), dl.created_ms < cutoff)
    if kind == "unresourced_events":  # events naming no resource: no history reads them
        return (
            lifecycle_events,
            ev.id,
            sa.and_(ev.resource_uuid == "", ev.time_ms < cutoff, ev.received_ms < cutoff),
        )
    if kind == "corrections":  # only once the event they explain is gone
        kept = [] if events_gone is None else [~events_gone]
        stored = sa.select(ev.event_id).where(ev.event_id == corr.event_id, *kept).exists()
        return corrections, corr.event_id, sa.and_(corr.time_ms < cutoff, ~stored)
    if kind == "domain_witness":
        return domain_witness, w.domain, sa.and_(w.running == sa.false(), w.since_ms < cutoff)
    if kind == "stream_marks":
        return stream_marks, stream_marks.c.stream_id, stream_marks.c.updated_ms < cutoff
    if kind == "outbox_sent":  # confirmed by every sink; pending ones stay whatever their age
        ob = handoff_outbox.c
        return handoff_outbox, ob.id, sa.and_(ob.sent_ms.is_not(None), ob.sent_ms < cutoff)
    # An account with credits keeps its usage: its balance is its credits minus the costs of every
    # month since its first credit, rated from these rows (balance_watch); pruning them would
    # hand the pruned usage's cost back to the account.
    prepaid = sa.select(credits.c.account)
    if kind == "usage_records":
        rec = usage_records.c
        return (
            usage_records,
            rec.id,
            sa.and_(rec.final == sa.true(), rec.window_end_ms <= usage_through, rec.account.not_in(prepaid)),
        )
    if kind == "usage_adjustments":
        adj = usage_adjustments.c
        return (
            usage_adjustments,
            adj.id,
            sa.and_(adj.window_end_ms <= usage_through, adj.account.not_in(prepaid)),
        )
    if kind == "unbilled_bytes":
        return unbilled_bytes, unbilled_bytes.c.id, unbilled_bytes.c.window_end_ms <= usage_through
    raise ValueError(f"no row-by-row pruning for {kind!r}")


class Pruning(UsageWrites):
    """Pages of old rows and their deletion; tombstones of pruned histories."""

    def old_keys(
        self,
        conn: Connection,
        kind: str,
        cutoff: int,
        after: Any,
        limit: int,
        *,
        lock: bool,
        usage_through: int = 0,
        events_gone: Any = None,
    ) -> list[Any]:
        """Keys (ascending, after `after`) of at most `limit` rows of `kind` that may go."""
        table, key, condition = old_rows(kind, cutoff, usage_through, events_gone)
        query = sa.select(key).where(condition, key > after).order_by(key).limit(limit)
        if lock and self.is_postgres and table in (parked_measures, stream_marks):
            query = query.with_for_update(skip_locked=True)
        return [row[0] for row in conn.execute(query)]

    def delete_keys(self, conn: Connection, kind: str, keys: Sequence[Any]) -> int:
        """Delete rows by key; a stream mark takes its stream's gaps along. Returns the
        gaps deleted (the rows themselves are `len(keys)`)."""
        table, key, _ = old_rows(kind, 0)
        gaps = 0
        for part in slices(keys, 1000):
            if table is usage_records:  # their versions stay: no transaction id is given twice
                self._lock_records(conn, part)
                versions.keep_pruned(conn, self, part)
            if table is stream_marks:
                gaps += int(
                    conn.execute(sa.delete(stream_gaps).where(stream_gaps.c.stream_id.in_(part))).rowcount
                )
            conn.execute(sa.delete(table).where(key.in_(part)))
        return gaps

    def _lock_records(self, conn: Connection, ids: Sequence[Any]) -> None:
        """PostgreSQL: before their versions are kept and the rows deleted, the resources'
        advisory locks (a recompute holding one has read the records, and the usage watermark
        it read stays true until it commits), then the records' row locks in key order, as
        adjusters take them: an adjustment in flight commits first, and the version kept
        below is the one it gave."""
        if not self.is_postgres or not ids:
            return
        rec = usage_records.c
        resources: list[str] = list(
            conn.execute(sa.select(rec.resource).where(rec.id.in_(ids)).distinct()).scalars()
        )
        self.lock_resources(conn, resources)
        order = [rec[c].collate("C") if isinstance(rec[c].type, sa.String) else rec[c] for c in KEY_COLUMNS]
        conn.execute(sa.select(rec.id).where(rec.id.in_(ids)).order_by(*order).with_for_update()).all()

    def corrections_of_resources(self, conn: Connection, resources: Sequence[str], cutoff: int) -> int:
        """Corrections older than `cutoff` whose event is stored under one of these resources:
        those a pass deletes once it has deleted the resources' events (a dry pass counts them)."""
        ev, corr = lifecycle_events.c, corrections.c
        total = 0
        for part in slices(sorted(resources)):
            query = (
                sa.select(sa.func.count())
                .select_from(corrections.join(lifecycle_events, ev.event_id == corr.event_id))
                .where(corr.time_ms < cutoff, ev.resource_uuid.in_(part))
            )
            total += int(conn.execute(query).scalar() or 0)
        return total

    def gaps_count(self, conn: Connection, streams: Sequence[str]) -> int:
        total = 0
        for part in slices(streams, 1000):
            query = (
                sa.select(sa.func.count()).select_from(stream_gaps).where(stream_gaps.c.stream_id.in_(part))
            )
            total += int(conn.execute(query).scalar() or 0)
        return total

    # -- lifecycle events, a whole resource at a time ------------------------------------------
    def event_resources(self, conn: Connection, after: str, limit: int) -> list[tuple[str, int, int, int]]:
        """(resource, events, latest event time, latest reception) of resources after `after`,
        by resource (resources with no uuid left out: unresourced_events is theirs)."""
        ev = lifecycle_events.c
        query = (
            sa.select(ev.resource_uuid, sa.func.count(), sa.func.max(ev.time_ms), sa.func.max(ev.received_ms))
            .where(ev.resource_uuid > max(after, ""))
            .group_by(ev.resource_uuid)
            .order_by(ev.resource_uuid)
            .limit(limit)
        )
        return [(r[0], int(r[1]), int(r[2]), int(r[3])) for r in conn.execute(query)]

    def parked_carrying(
        self,
        conn: Connection,
        instances: Iterable[str],
        macs: Iterable[str],
        addresses: Iterable[str],
        gone: Any = None,
    ) -> tuple[set[str], set[str], set[str]]:
        """Which of these instance uuids, MACs and addresses a parked measure still carries
        (gone: a condition of parked measures counted as deleted already, by a dry pass)."""
        pm = parked_measures.c
        found: tuple[set[str], set[str], set[str]] = (set(), set(), set())
        for column, values, into in zip(
            (pm.instance_uuid, pm.mac, pm.address), (instances, macs, addresses), found, strict=True
        ):
            for part in slices(sorted({v for v in values if v})):
                query = sa.select(column).where(column.in_(part), *([] if gone is None else [~gone]))
                into.update(row[0] for row in conn.execute(query.distinct()))
        return found

    def prune_resources(
        self, conn: Connection, seen: Mapping[str, tuple[int, int]], through: Mapping[str, int], now_ms: int
    ) -> dict[str, int]:
        """Delete all events of each resource still as it was seen ({resource: (events, latest
        event time)}) and leave its tombstone; returns {resource: events deleted}. Takes the
        resources' locks first (PostgreSQL), as writers of their records do."""
        ev = lifecycle_events.c
        resources = sorted(seen)
        self.lock_resources(conn, resources)
        now: dict[str, tuple[int, int]] = {}
        for part in slices(resources):
            query = (
                sa.select(ev.resource_uuid, sa.func.count(), sa.func.max(ev.time_ms))
                .where(ev.resource_uuid.in_(part))
                .group_by(ev.resource_uuid)
            )
            now.update({r[0]: (int(r[1]), int(r[2])) for r in conn.execute(query)})
        gone = [r for r in resources if now.get(r) == seen[r]]  # an event came meanwhile: next pass
        for part in slices(gone):
            conn.execute(sa.delete(lifecycle_events).where(ev.resource_uuid.in_(part)))
        delete_evicted_keys(conn, gone)  # nothing is left to bring back
        if gone:
            known = self.tombstones(conn, gone)
            stmt = self._insert(pruned_resources)
            stmt = stmt.on_conflict_do_update(
                index_elements=["resource"],
                set_={
                    "through_ms": stmt.excluded.through_ms,
                    "events": stmt.excluded.events,
                    "pruned_ms": stmt.excluded.pruned_ms,
                },
            )
            rows = [
                {
                    "resource": r,
                    "through_ms": max(through[r], known.get(r, through[r])),
                    "events": seen[r][0],
                    "pruned_ms": now_ms,
                }
                for r in gone
            ]
            conn.execute(stmt, rows)
        return {r: seen[r][0] for r in gone}

    def tombstones(self, conn: Connection, resources: Iterable[str]) -> dict[str, int]:
        """{resource: through_ms} of the resources named whose events were pruned."""
        pr = pruned_resources.c
        out: dict[str, int] = {}
        for part in slices(sorted(set(resources))):
            out.update(
                {
                    r[0]: int(r[1])
                    for r in conn.execute(sa.select(pr.resource, pr.through_ms).where(pr.resource.in_(part)))
                }
            )
        return out

    # -- usage's watermark ----------------------------------------------------------------------
    def usage_pruned_through(self, conn: Connection) -> int:
        """Windows ending by this instant were pruned: recomputes leave them alone."""
        query = sa.select(collector_state.c.value).where(collector_state.c.name == USAGE_PRUNED_THROUGH)
        return int(conn.execute(query).scalar() or 0)

    def raise_usage_pruned_through(self, conn: Connection, through_ms: int) -> None:
        if through_ms <= self.usage_pruned_through(conn):
            return
        stmt = self._insert(collector_state).values(name=USAGE_PRUNED_THROUGH, value=through_ms)
        conn.execute(stmt.on_conflict_do_update(index_elements=["name"], set_={"value": stmt.excluded.value}))
