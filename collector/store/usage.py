"""Usage records and finalization: additive byte usage, unbilled bytes, whole time-based
values, adjustments to final windows, and the watermark below which windows are final."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from kvmeter.collector import billable
from kvmeter.collector.model import LATE_LIFECYCLE, UsageKey
from kvmeter.collector.schema import (
    FINALIZED_THROUGH,
    KEY_COLUMNS,
    TIME_TYPES,
    collector_state,
    unbilled_bytes,
    usage_adjustments,
    usage_records,
)
from kvmeter.collector.store import item_costs, outbox, sequence, versions
from kvmeter.collector.store.engine import StoreCore, slices

# Column orders of the tuples _upsert_rows writes: the UsageKey's fields first, as UsageKey has them.
_RECORD_COLUMNS = (
    *KEY_COLUMNS, "quantity", "final", "resource_name", "device_type", "created_ms", "updated_ms"
)  # fmt: skip
_UNBILLED_COLUMNS = (*KEY_COLUMNS, "bytes", "updated_ms")
if UsageKey._fields != KEY_COLUMNS:  # the tuples above rely on it
    raise RuntimeError(f"UsageKey fields {UsageKey._fields} differ from KEY_COLUMNS {KEY_COLUMNS}")


def resource_lock_id(resource: str) -> int:
    """A stable signed 64-bit id for pg_advisory_xact_lock."""
    return int.from_bytes(hashlib.blake2b(resource.encode(), digest_size=8).digest(), "big", signed=True)


class UsageWrites(StoreCore):
    """Writes of usage records: bytes add up, time-based values are whole, final windows adjust."""

    # -- finalization watermark ---------------------------------------------------------------
    def finalized_through(self, conn: Connection, *, lock: bool = True) -> int:
        """All windows ending at or before this instant are final. Shared lock for writers."""
        stmt = sa.select(collector_state.c.value).where(collector_state.c.name == FINALIZED_THROUGH)
        if lock and self.is_postgres:
            stmt = stmt.with_for_update(read=True)
        return int(conn.execute(stmt).scalar() or 0)

    def finalize(self, conn: Connection, through_ms: int, now_ms: int) -> int:
        """Make every window ending at or before `through_ms` final; returns records finalized."""
        stmt = sa.select(collector_state.c.value).where(collector_state.c.name == FINALIZED_THROUGH)
        if self.is_postgres:
            stmt = stmt.with_for_update()
        current = int(conn.execute(stmt).scalar() or 0)
        if through_ms <= current:
            return 0
        conn.execute(
            sa.update(collector_state)
            .where(collector_state.c.name == FINALIZED_THROUGH)
            .values(value=through_ms)
        )
        if self.outbox:  # the records as they become final: one billable item each (not zeros)
            rec = usage_records.c
            query = sa.select(*(rec[c] for c in KEY_COLUMNS), rec.quantity, rec.resource_name).where(
                rec.final == sa.false(), rec.window_end_ms <= through_ms, rec.quantity != 0
            )
            items = [
                billable.record_item(UsageKey(*row[:7]), int(row[7]), row[8], now_ms)
                for row in conn.execute(query.order_by(*(rec[c] for c in KEY_COLUMNS)))
            ]
            item_costs.price_items(conn, self, items, now_ms)
            outbox.add_items(conn, self, items, now_ms)
        result = conn.execute(
            sa.update(usage_records)
            .where(usage_records.c.final == sa.false(), usage_records.c.window_end_ms <= through_ms)
            .values(final=True, updated_ms=now_ms)
        )
        return int(result.rowcount or 0)

    # -- byte usage (additive) ----------------------------------------------------------------
    def add_bytes(
        self,
        conn: Connection,
        increments: Mapping[UsageKey, int],
        names: Mapping[UsageKey, tuple[str, str]],
        final_through: int,
        now_ms: int,
        reason: str = "late bytes",
    ) -> tuple[int, int]:
        """Add byte increments; an increment to a final window becomes an adjustment row.

        names: {key: (resource_name, device_type)}. Returns (records upserted, adjustments).
        """
        open_rows: list[tuple[Any, ...]] = []
        late: dict[UsageKey, int] = {}
        no_name = ("", "")
        for key in sorted(increments):  # a fixed order: no deadlocks between replicas
            amount = increments[key]
            if amount == 0:
                continue
            if key.window_end_ms <= final_through:
                late[key] = amount
                continue
            name, device = names.get(key, no_name)
            open_rows.append((*key, amount, False, name, device, now_ms, now_ms))
        if open_rows:
            self._upsert_rows(conn, usage_records, _RECORD_COLUMNS, open_rows, "quantity", add=True)
        if late:
            self._adjust(conn, late, names, now_ms, reason)
        return len(open_rows), len(late)

    def add_unbilled(self, conn: Connection, increments: Mapping[UsageKey, int], now_ms: int) -> None:
        rows = [(*k, increments[k], now_ms) for k in sorted(increments) if increments[k]]
        if rows:
            self._upsert_rows(conn, unbilled_bytes, _UNBILLED_COLUMNS, rows, "bytes", add=True)

    def _adjust(
        self,
        conn: Connection,
        deltas: Mapping[UsageKey, int],
        names: Mapping[UsageKey, tuple[str, str]],
        now_ms: int,
        reason: str,
    ) -> None:
        """Adjustment rows for final windows; a key new to a final window gets a zero record
        (final) so that reports list it, with the whole amount as the adjustment."""
        keys = sorted(deltas)
        # Each adjustment is the record's next version; the upsert row-locks the record (in key
        # order: no deadlock between replicas), so two replicas adjusting it take turns. A record
        # pruned or rebuilt away continues from its kept version (store/versions.py): a version,
        # hence a transaction id, is never given twice.
        kept = versions.floors(conn, keys)
        stmt = self._insert(usage_records)
        rec = usage_records.c
        stmt = stmt.on_conflict_do_update(
            index_elements=list(KEY_COLUMNS),
            set_={
                "version": sa.case(
                    (stmt.excluded.version > rec.version + 1, stmt.excluded.version), else_=rec.version + 1
                )
            },
        )
        conn.execute(
            stmt,
            [
                {
                    **_key_dict(k),
                    "quantity": 0,
                    "final": True,
                    "resource_name": names.get(k, ("", ""))[0],
                    "device_type": names.get(k, ("", ""))[1],
                    "created_ms": now_ms,
                    "updated_ms": now_ms,
                    "version": kept.get(k, 0) + 1,
                }
                for k in keys
            ],
        )
        made = self._versions(conn, keys)
        # A record a retention pass deleted while this upsert waited for its row (or just
        # before it) was inserted again from the versions read above, before that pass
        # committed the version it kept: continue after the kept version, read again now that
        # this transaction holds the record's row (the pass's commit is visible to it).
        behind = {k: v + 1 for k, v in versions.floors(conn, keys).items() if v >= made[k]}
        for k, version in sorted(behind.items()):
            conn.execute(
                sa.update(usage_records)
                .where(*(rec[c] == getattr(k, c) for c in KEY_COLUMNS))
                .values(version=version)
            )
        made.update(behind)
        conn.execute(
            sa.insert(usage_adjustments),
            [
                {
                    **_key_dict(k),
                    "delta": deltas[k],
                    "reason": reason,
                    "created_ms": now_ms,
                    "version": made[k],
                }
                for k in keys
            ],
        )
        sequence.mark_pending(conn, sequence.ADJUSTMENTS)
        if self.outbox:
            items = [billable.adjustment_item(k, made[k], deltas[k], reason, now_ms) for k in keys]
            item_costs.price_items(conn, self, items, now_ms)
            outbox.add_items(conn, self, items, now_ms)

    def _versions(self, conn: Connection, keys: Sequence[UsageKey]) -> dict[UsageKey, int]:
        """Current versions of these records (locked by this transaction's upsert)."""
        return versions.key_versions(conn, usage_records, keys)

    # -- time-based usage (whole values) ------------------------------------------------------
    def lock_resources(self, conn: Connection, resources: Iterable[str]) -> None:
        """Per-resource advisory locks, taken in resource order, in one round trip (unnest
        yields the array in order, and the aggregate takes each lock as its row comes)."""
        ids = [resource_lock_id(r) for r in sorted(set(resources))]
        if self.is_postgres and ids:
            conn.execute(
                sa.text("SELECT count(pg_advisory_xact_lock(k)) FROM unnest(CAST(:ids AS bigint[])) AS k"),
                {"ids": ids},
            )

    def set_time_values_many(
        self,
        conn: Connection,
        values: Mapping[str, Mapping[UsageKey, int]],
        final_through: int,
        now_ms: int,
        *,
        open_only: bool = False,
        floors: Mapping[str, int] | None = None,
        reason: str = LATE_LIFECYCLE,
    ) -> tuple[int, int]:
        """Make the stored time-based records of each resource equal its `values` (whole values;
        {resource: {key: quantity}}): a few statements for all of them.

        Open windows are updated in place (a zero value removes the record); a final window
        that differs from its net gets an adjustment. With open_only, only windows ending
        after `final_through` are considered (a tick: time alone changes nothing final).
        Windows ending by a resource's floor (retention: pruned history or pruned usage) are
        left as they are. Call lock_resources first. Returns (records written, adjustments).
        """
        stored = self._time_records(conn, sorted(values), final_through if open_only else None)
        upserts: list[tuple[Any, ...]] = []
        deletes: list[int] = []
        late: dict[UsageKey, int] = {}
        for resource in sorted(values):
            floor = max(final_through if open_only else 0, (floors or {}).get(resource, 0))
            wanted = {k: v for k, v in values[resource].items() if k.window_end_ms > floor}
            had = stored.get(resource, {})
            for key in sorted(set(wanted) | set(had)):
                if key.window_end_ms <= floor:
                    continue
                new = wanted.get(key, 0)
                record = had.get(key)
                if key.window_end_ms <= final_through:
                    net = record[1] + record[2] if record else 0
                    if new != net:
                        late[key] = new - net
                elif record is None:
                    if new:
                        upserts.append((*key, new, False, "", "", now_ms, now_ms))
                elif new == 0:
                    deletes.append(record[0])
                elif new != record[1]:
                    upserts.append((*key, new, False, "", "", now_ms, now_ms))
        if upserts:  # tuples in _RECORD_COLUMNS order, distinct keys
            self._upsert_rows(conn, usage_records, _RECORD_COLUMNS, upserts, "quantity", add=False)
        for part in slices(deletes):
            conn.execute(sa.delete(usage_records).where(usage_records.c.id.in_(part)))
        if late:
            self._adjust(conn, late, {}, now_ms, reason)
        return len(upserts) + len(deletes), len(late)

    def _time_records(
        self, conn: Connection, resources: Sequence[str], after: int | None
    ) -> dict[str, dict[UsageKey, tuple[int, int, int]]]:
        """{resource: {key: (id, quantity, adjustments)}} of the resources' time-based records."""
        rec, adj = usage_records.c, usage_adjustments.c
        out: dict[str, dict[UsageKey, tuple[int, int, int]]] = {}
        for part in slices(resources):
            query = sa.select(rec.id, rec.quantity, *(rec[c] for c in KEY_COLUMNS)).where(
                rec.resource.in_(part), rec.usage_type.in_(TIME_TYPES)
            )
            if after is not None:
                query = query.where(rec.window_end_ms > after)
            for row in conn.execute(query):
                key = UsageKey(*row[2:])
                out.setdefault(key.resource, {})[key] = (int(row[0]), int(row[1]), 0)
            if after is not None:  # adjustments exist for final windows only
                continue
            aq = (
                sa.select(*(adj[c] for c in KEY_COLUMNS), sa.func.sum(adj.delta))
                .where(adj.resource.in_(part), adj.usage_type.in_(TIME_TYPES))
                .group_by(*(adj[c] for c in KEY_COLUMNS))
            )
            for row in conn.execute(aq):
                key = UsageKey(*row[:7])
                records = out.get(key.resource, {})
                if key in records:
                    ident, quantity, _ = records[key]
                    records[key] = (ident, quantity, int(row[7]))
        return out


def _key_dict(key: UsageKey) -> dict[str, Any]:
    return {
        "account": key.account,
        "usage_type": key.usage_type,
        "resource": key.resource,
        "offering": key.offering,
        "detail": key.detail,
        "window_start_ms": key.window_start_ms,
        "window_end_ms": key.window_end_ms,
    }
