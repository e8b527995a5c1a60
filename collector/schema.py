"""The collector's database schema: its tables (the numbered migrations that create them are in
schema_migrations).

The same schema on SQLite and PostgreSQL. Every time is an integer of milliseconds since the
epoch (UTC): no timezone or datetime type differences between the two databases.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from kvmeter.collector import schema_outbox, schema_policy

metadata = sa.MetaData()

KEY_COLUMNS = ("account", "usage_type", "resource", "offering", "detail", "window_start_ms", "window_end_ms")
TIME_TYPES = (1, 2, 3)
FINALIZED_THROUGH = "finalized_through_ms"
EVENT_SEQ = "event_seq"  # the last seq given to a lifecycle event (store/sequence.py, migration 24)
UPDATED_FILLFACTOR = 50  # percent of a PostgreSQL page inserts fill in tables updated in place

_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite autoincrements INTEGER PKs only


def _key_columns() -> list[sa.Column[Any]]:
    return [
        sa.Column("account", sa.String(64), nullable=False),
        sa.Column("usage_type", sa.Integer, nullable=False),
        sa.Column("resource", sa.String(128), nullable=False),
        sa.Column("offering", sa.String(128), nullable=False),
        sa.Column("detail", sa.String(64), nullable=False),
        sa.Column("window_start_ms", sa.BigInteger, nullable=False),
        sa.Column("window_end_ms", sa.BigInteger, nullable=False),
    ]


schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("applied_ms", sa.BigInteger, nullable=False),
)

# quantity: bytes (types 4/5) or milliseconds (time-based types). Once `final`, quantity is
# frozen; later changes are rows of usage_adjustments and the net is their sum.
usage_records = sa.Table(
    "usage_records",
    metadata,
    sa.Column("id", _id, primary_key=True, autoincrement=True),
    *_key_columns(),
    sa.Column("quantity", sa.BigInteger, nullable=False),
    sa.Column("final", sa.Boolean, nullable=False),
    sa.Column("resource_name", sa.String(128), nullable=False),
    sa.Column("device_type", sa.String(32), nullable=False),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
    sa.Column("updated_ms", sa.BigInteger, nullable=False),
    schema_outbox.version_column(),  # adjustments so far (migration 14)
    sa.UniqueConstraint(*KEY_COLUMNS, name="uq_usage_records_key"),
)
sa.Index("ix_usage_records_window", usage_records.c.window_start_ms)
sa.Index("ix_usage_records_resource", usage_records.c.resource)

usage_adjustments = sa.Table(
    "usage_adjustments",
    metadata,
    sa.Column("id", _id, primary_key=True, autoincrement=True),
    *_key_columns(),
    sa.Column("delta", sa.BigInteger, nullable=False),
    sa.Column("reason", sa.String(64), nullable=False),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
    schema_outbox.version_column(),  # the record's version this adjustment made (migration 14)
    schema_outbox.seq_column(),  # commit order, what /v1/adjustments pages by (migration 14)
)
sa.Index("ix_usage_adjustments_seq", usage_adjustments.c.seq, unique=True)
sa.Index("ix_usage_adjustments_key", *(usage_adjustments.c[name] for name in KEY_COLUMNS))
sa.Index("ix_usage_adjustments_resource", usage_adjustments.c.resource)

stream_marks = sa.Table(
    "stream_marks",
    metadata,
    sa.Column("stream_id", sa.String(128), primary_key=True),
    sa.Column("host_id", sa.String(128), nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("updated_ms", sa.BigInteger, nullable=False),
)

# Batches a stream skipped (seq jumped past them): applied if they arrive later, out of order;
# a gap that stays is a batch that never arrived (migration 3).
stream_gaps = sa.Table(
    "stream_gaps",
    metadata,
    sa.Column("id", _id, primary_key=True, autoincrement=True),
    sa.Column("stream_id", sa.String(128), nullable=False, index=True),
    sa.Column("first_seq", sa.BigInteger, nullable=False),
    sa.Column("last_seq", sa.BigInteger, nullable=False),
)

# Each event's payload is kept once: `raw`, the value as received, with `record_key`, the record's
# key where it is not the resource uuid (cloudstack.key_to_keep), parses again to the same event
# (a rebuild under newer code). `normalized` is the part of the event the state machine reads
# (lifecycle.as_read: its fields, not the payload's other keys), what histories are built from
# (migration 11).
lifecycle_events = sa.Table(
    "lifecycle_events",
    metadata,
    sa.Column("id", _id, primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.String(128), nullable=False, unique=True),
    sa.Column("resource_uuid", sa.String(128), nullable=False, index=True),
    sa.Column("time_ms", sa.BigInteger, nullable=False),
    sa.Column("raw", sa.LargeBinary, nullable=False),
    sa.Column("normalized", sa.LargeBinary, nullable=False),
    sa.Column("received_ms", sa.BigInteger, nullable=False),
    sa.Column("record_key", sa.LargeBinary, nullable=True),
    # Commit order (store/sequence.py), what replicas' syncs page by (migration 24): ids of two
    # replicas' inserts commit in any order, and a cursor by id could step over one.
    sa.Column("seq", sa.BigInteger, nullable=True),
)
sa.Index("ix_lifecycle_events_seq", lifecycle_events.c.seq, unique=True)


def _measure_table(name: str, *extra: sa.Column[Any]) -> sa.Table:
    return sa.Table(
        name,
        metadata,
        sa.Column("id", _id, primary_key=True, autoincrement=True),
        sa.Column("stream_id", sa.String(128), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("idx", sa.Integer, nullable=False),
        sa.Column("instance_uuid", sa.String(128), nullable=False, index=True),
        sa.Column("mac", sa.String(32), nullable=False, index=True),
        sa.Column("address", sa.String(64), nullable=False, index=True),
        sa.Column("start_ms", sa.BigInteger, nullable=False),
        sa.Column("end_ms", sa.BigInteger, nullable=False),
        sa.Column("direction", sa.String(16), nullable=False),
        sa.Column("traffic_type", sa.String(32), nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("measure", sa.Text, nullable=False),  # the Measure as JSON
        *extra,
        sa.UniqueConstraint("stream_id", "seq", "idx", name=f"uq_{name}_identity"),
    )


# reported_ms: when the measure, still parked past the horizon, was added to usage as
# UNATTRIBUTED (migration 2); attributing it later moves those bytes to the owner.
parked_measures = _measure_table(
    "parked_measures",
    sa.Column("parked_ms", sa.BigInteger, nullable=False),
    sa.Column("reported_ms", sa.BigInteger, nullable=True),
)
quarantined_measures = _measure_table(
    "quarantined_measures",
    sa.Column("reason", sa.String(256), nullable=False),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
)

dead_letters = sa.Table(
    "dead_letters",
    metadata,
    sa.Column("id", _id, primary_key=True, autoincrement=True),
    sa.Column("digest", sa.String(64), nullable=False, unique=True),  # a redelivery is not a new letter
    sa.Column("source", sa.String(32), nullable=False),
    sa.Column("origin", sa.String(256), nullable=False),
    sa.Column("raw", sa.LargeBinary, nullable=False),
    sa.Column("reason", sa.String(64), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
    # Re-driving (migration 12): the record's key (a lifecycle event may name its resource only
    # there), retries so far, the last one, and when one succeeded (the letter is kept).
    sa.Column("record_key", sa.LargeBinary, nullable=True),
    sa.Column("retries", sa.Integer, nullable=False, server_default="0"),
    sa.Column("retried_ms", sa.BigInteger, nullable=True),
    sa.Column("resolved_ms", sa.BigInteger, nullable=True),
)

# Bytes of traffic types the operator does not bill (guest, control, ...), per key like usage:
# billed + unbilled + parked + quarantined accounts for every metered byte (migration 4).
# Informational and additive: no finalization, no adjustments.
unbilled_bytes = sa.Table(
    "unbilled_bytes",
    metadata,
    sa.Column("id", _id, primary_key=True, autoincrement=True),
    *_key_columns(),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("updated_ms", sa.BigInteger, nullable=False),
    sa.UniqueConstraint(*KEY_COLUMNS, name="uq_unbilled_bytes_key"),
)

# What the agents saw of each domain's owner in CloudStack's <metadata> (migration 5), by domain
# uuid and name. Batches carry the inventory only now and then; this keeps it for the rest.
owner_hints = sa.Table(
    "owner_hints",
    metadata,
    sa.Column("domain", sa.String(255), primary_key=True),
    sa.Column("owner", sa.Text, nullable=False),  # JSON object of the <metadata> owner fields
    sa.Column("updated_ms", sa.BigInteger, nullable=False),
)

# What the reconciler changed (migration 8): one row per correcting event it stored in
# lifecycle_events (same event id), with its source and reason, for the API and the CLI.
corrections = sa.Table(
    "corrections",
    metadata,
    sa.Column("event_id", sa.String(64), primary_key=True),
    sa.Column("resource", sa.String(128), nullable=False),
    sa.Column("resource_type", sa.String(32), nullable=False),
    sa.Column("event_type", sa.String(32), nullable=False),
    sa.Column("time_ms", sa.BigInteger, nullable=False),
    sa.Column("account", sa.String(64), nullable=False),
    sa.Column("offering", sa.String(128), nullable=False),
    sa.Column("source", sa.String(32), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
)
sa.Index("ix_corrections_time", corrections.c.time_ms)

# Names CloudStack's API gave (migration 8): accounts (parent = domain uuid), domains (parent =
# path) and service offerings (parent = "cpu/memory"), by uuid.
cloudstack_names = sa.Table(
    "cloudstack_names",
    metadata,
    sa.Column("kind", sa.String(16), primary_key=True),
    sa.Column("uuid", sa.String(128), primary_key=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("parent", sa.String(1024), nullable=False),
    sa.Column("updated_ms", sa.BigInteger, nullable=False),
)

# The agents' view of each domain (migration 8): running or not since a poll time, from the
# inventories of measure batches; the reconciler's second witness. Written on changes only.
domain_witness = sa.Table(
    "domain_witness",
    metadata,
    sa.Column("domain", sa.String(128), primary_key=True),
    sa.Column("running", sa.Boolean, nullable=False),
    sa.Column("since_ms", sa.BigInteger, nullable=False),
    sa.Column("seen_ms", sa.BigInteger, nullable=True),  # migration 22: the last poll, when it left memory
)

# The reconciler's last snapshot of CloudStack (migration 8), JSON: the previous pass of the next.
reconcile_state = sa.Table(
    "reconcile_state",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("updated_ms", sa.BigInteger, nullable=False),
)

# Credentials minted by `kvmeter credentials create` (migration 10). lookup: the SHA-256 of a
# bearer token, or a CloudStack API key. secret: a CloudStack secret key itself (a request's HMAC
# is verified with it), NULL for tokens. accounts: JSON list, NULL for operator-wide; domains:
# JSON list of CloudStack domain uuids. A revoked credential stays, with revoked_ms set.
api_credentials = sa.Table(
    "api_credentials",
    metadata,
    sa.Column("id", _id, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("lookup", sa.String(128), nullable=False, unique=True),
    sa.Column("secret", sa.Text, nullable=True),
    sa.Column("accounts", sa.Text, nullable=True),
    sa.Column("domains", sa.Text, nullable=False),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
    sa.Column("revoked_ms", sa.BigInteger, nullable=True),
)

collector_state = sa.Table(
    "collector_state",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.BigInteger, nullable=False),
)

handoff_outbox = schema_outbox.outbox_table(metadata)  # billable items to hand off (migration 14)
billing_policies = schema_policy.policies_table(metadata)  # the policies records followed (migration 17)

# The tables of the first released schema (migration 1).
V1_TABLES = [
    usage_records,
    usage_adjustments,
    stream_marks,
    lifecycle_events,
    parked_measures,
    quarantined_measures,
    dead_letters,
    collector_state,
]
