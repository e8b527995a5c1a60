"""The last version of records no longer in usage_records (migration 19).

A billable item's transaction id is derived from its record's key and version (billable.py), so
a version must never be given twice to one key. usage_records.version counts them while the
record exists; once retention prunes a record, or a rebuild starts a new store, that count would
restart at 0 and the next change to the window would repeat an id already handed off with other
content. Pruning writes the pruned record's version here (records with adjustments only: a record
at version 0 is continued safely from 1), a rebuild copies the live store's versions here, and an
adjustment to a key without a record (or with a lower version) continues from this row.
One small row per adjusted-then-pruned record, kept for good.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from kvmeter.collector.schema import KEY_COLUMNS, _key_columns, metadata

record_versions = sa.Table(
    "record_versions",
    metadata,
    *_key_columns(),
    sa.Column("version", sa.Integer, nullable=False),
    sa.UniqueConstraint(*KEY_COLUMNS, name="uq_record_versions_key"),
)


def migration_19(conn: Connection) -> None:
    record_versions.create(conn, checkfirst=True)
