"""Retention's tables and indexes (migration 15).

pruned_resources: one row per resource whose lifecycle events were pruned (a tombstone, kept for
good: a few dozen bytes per resource ever seen). `through_ms` is the latest instant the pruned
history spoke of (its last event or segment end): an event of that resource stamped at or
before it is of the pruned past and changes nothing, and a recompute of the resource leaves
windows ending by then alone (their records stay as they were billed).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from kvmeter.collector.schema import (
    dead_letters,
    metadata,
    quarantined_measures,
    usage_adjustments,
)

USAGE_PRUNED_THROUGH = "usage_pruned_through_ms"  # collector_state: windows ending by then pruned

pruned_resources = sa.Table(
    "pruned_resources",
    metadata,
    sa.Column("resource", sa.String(128), primary_key=True),
    sa.Column("through_ms", sa.BigInteger, nullable=False),
    sa.Column("events", sa.Integer, nullable=False),  # how many were pruned (the last time)
    sa.Column("pruned_ms", sa.BigInteger, nullable=False),
)

# What pruning selects by age, so that a pass reads the old rows, not the table (parked
# measures are few: they leave as soon as an owner is known).
_INDEXES = (
    ("ix_quarantined_measures_created", quarantined_measures, "created_ms"),
    ("ix_dead_letters_created", dead_letters, "created_ms"),
    ("ix_usage_adjustments_window_end", usage_adjustments, "window_end_ms"),
)


def migration_15(conn: Connection) -> None:
    pruned_resources.create(conn, checkfirst=True)
    for name, table, column in _INDEXES:
        conn.execute(sa.text(f"CREATE INDEX IF NOT EXISTS {name} ON {table.name} ({column})"))
