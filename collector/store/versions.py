"""Record versions that outlive their records (schema_versions.record_versions): written when
retention prunes an adjusted record and when a rebuild carries the live store's versions over,
read when a final window is adjusted, so a (key, version) pair, hence a transaction id, is
never given twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from kvmeter.collector.model import UsageKey
from kvmeter.collector.schema import KEY_COLUMNS, usage_records
from kvmeter.collector.schema_versions import record_versions
from kvmeter.collector.store.engine import StoreCore, slices


def _greatest(stmt: Any) -> Any:
    """An upsert of record_versions that keeps the higher version."""
    rv = record_versions.c
    higher = sa.case((stmt.excluded.version > rv.version, stmt.excluded.version), else_=rv.version)
    return stmt.on_conflict_do_update(index_elements=list(KEY_COLUMNS), set_={"version": higher})


def floors(conn: Connection, keys: Sequence[UsageKey]) -> dict[UsageKey, int]:
    """{key: last version given} of the keys named that have a row (the others: none)."""
    return key_versions(conn, record_versions, keys)


def key_versions(conn: Connection, table: sa.Table, keys: Sequence[UsageKey]) -> dict[UsageKey, int]:
    """{key: version} of the named keys that have a row in `table` (keyed by KEY_COLUMNS)."""
    col = table.c
    wanted = set(keys)
    out: dict[UsageKey, int] = {}
    for part in slices(sorted({k.resource for k in keys})):
        query = sa.select(*(col[c] for c in KEY_COLUMNS), col.version).where(
            col.resource.in_(part),
            col.window_start_ms >= min(k.window_start_ms for k in keys),
            col.window_start_ms <= max(k.window_start_ms for k in keys),
        )
        for row in conn.execute(query):
            key = UsageKey(*row[:7])
            if key in wanted:
                out[key] = int(row[7])
    return out


def keep_pruned(conn: Connection, store: StoreCore, record_ids: Sequence[int]) -> None:
    """Before these records are deleted: the versions of those with adjustments."""
    rec = usage_records.c
    for part in slices(list(record_ids), 1000):
        source = sa.select(*(rec[c] for c in KEY_COLUMNS), rec.version).where(
            rec.id.in_(part), rec.version > 0
        )
        stmt = store._insert(record_versions).from_select([*KEY_COLUMNS, "version"], source)
        conn.execute(_greatest(stmt))


def carry(conn: Connection, store: StoreCore, versions: Iterable[tuple[UsageKey, int]]) -> int:
    """Write (key, version) pairs given elsewhere (a rebuild: the live store's); returns how many."""
    rows = [{**k._asdict(), "version": v} for k, v in versions if v > 0]
    for part in slices(rows, 1000):
        conn.execute(_greatest(store._insert(record_versions)), list(part))
    return len(rows)


def given(conn: Connection) -> Iterable[tuple[UsageKey, int]]:
    """Every (key, last version) this store gave: its records' and its kept versions (a key in
    both yields both; carry keeps the higher)."""
    tables = [usage_records]
    if sa.inspect(conn).has_table(record_versions.name):  # a live store not yet migrated has none
        tables.append(record_versions)
    for cols in (t.c for t in tables):
        query = sa.select(*(cols[c] for c in KEY_COLUMNS), cols.version).where(cols.version > 0)
        for row in conn.execute(query):
            yield UsageKey(*row[:7]), int(row[7])
