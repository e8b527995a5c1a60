"""Bounded memory's table (migration 22): by MAC and address, the resources that left a replica's
memory, so what finds them again is in the store and not in memory (residency.py).

evicted_keys   one row per (key, resource): a MAC or address attribution may find the resource
               by, and when its last segment ended (a measure starting after that never needs
               it). Written when a resource leaves memory; a key's rows of resources in memory
               are ignored; deleted with the resource's events by retention.

Migration 22 also gives domain_witness the agents' last poll of a domain (seen_ms), written when
the witness leaves memory, so a witness read back is the one that left.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

metadata = sa.MetaData()

evicted_keys = sa.Table(
    "evicted_keys",
    metadata,
    sa.Column("key", sa.String(128), primary_key=True),
    sa.Column("resource", sa.String(128), primary_key=True),
    sa.Column("last_end_ms", sa.BigInteger, nullable=False),
)


def migration_22(conn: Connection) -> None:
    evicted_keys.create(conn, checkfirst=True)
    if "seen_ms" not in {c["name"] for c in sa.inspect(conn).get_columns("domain_witness")}:
        conn.execute(sa.text("ALTER TABLE domain_witness ADD COLUMN seen_ms BIGINT"))
