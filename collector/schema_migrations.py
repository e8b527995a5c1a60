"""The numbered migrations that create and change the collector's tables (schema.py), in order.

Numbered, append-only: a released migration never changes; a schema change adds one. Store.migrate
applies those a store has not had yet, on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import re

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from kvmeter.collector import schema_credits, schema_outbox, schema_policy, schema_residency
from kvmeter.collector.schema import (
    EVENT_SEQ,
    FINALIZED_THROUGH,
    KEY_COLUMNS,
    UPDATED_FILLFACTOR,
    V1_TABLES,
    api_credentials,
    billing_policies,
    cloudstack_names,
    collector_state,
    corrections,
    dead_letters,
    domain_witness,
    handoff_outbox,
    lifecycle_events,
    metadata,
    owner_hints,
    reconcile_state,
    stream_gaps,
    unbilled_bytes,
    usage_adjustments,
    usage_records,
)
from kvmeter.proto import pb


def _migration_1(conn: Connection) -> None:
    metadata.create_all(conn, tables=V1_TABLES)
    conn.execute(sa.insert(collector_state).values(name=FINALIZED_THROUGH, value=0))


def _migration_2(conn: Connection) -> None:
    # Migration 1 creates tables from today's definitions, which already have the column.
    if "reported_ms" not in {c["name"] for c in sa.inspect(conn).get_columns("parked_measures")}:
        conn.execute(sa.text("ALTER TABLE parked_measures ADD COLUMN reported_ms BIGINT"))


def _migration_3(conn: Connection) -> None:
    stream_gaps.create(conn, checkfirst=True)


def _migration_4(conn: Connection) -> None:
    unbilled_bytes.create(conn, checkfirst=True)


# Numbered, append-only: a released migration never changes; schema changes add one.
def _migration_5(conn: Connection) -> None:
    owner_hints.create(conn, checkfirst=True)


def _migration_6(conn: Connection) -> None:
    # Every chunk of measures adds to the byte records of the open windows: with room left on
    # each page PostgreSQL rewrites such a row in place (a HOT update, no new index entries)
    # instead of moving it. SQLite has no such setting.
    if conn.dialect.name == "postgresql":
        for table in (usage_records, unbilled_bytes):
            conn.execute(sa.text(f"ALTER TABLE {table.name} SET (fillfactor = {UPDATED_FILLFACTOR})"))


def _migration_7(conn: Connection) -> None:
    # Paged reads (listUsageRecords, /v1/usage) walk records in (window_start_ms, id) order, all
    # accounts or one account's. SQLite's window index already ends in the rowid (= id).
    if conn.dialect.name == "postgresql":
        conn.execute(
            sa.text(
                "CREATE INDEX IF NOT EXISTS ix_usage_records_window_id ON usage_records (window_start_ms, id)"
            )
        )
    conn.execute(
        sa.text(
            "CREATE INDEX IF NOT EXISTS ix_usage_records_account_window "
            "ON usage_records (account, window_start_ms, id)"
        )
    )


def _migration_8(conn: Connection) -> None:
    for table in (corrections, cloudstack_names, domain_witness, reconcile_state):
        table.create(conn, checkfirst=True)


def _migration_9(conn: Connection) -> None:
    # listUsageRecords' count over a range reads this index alone (window end and account are
    # filters too), never the table.
    conn.execute(
        sa.text(
            "CREATE INDEX IF NOT EXISTS ix_usage_records_window_span "
            "ON usage_records (window_start_ms, window_end_ms, account)"
        )
    )


def _migration_10(conn: Connection) -> None:
    api_credentials.create(conn, checkfirst=True)


def _add_missing_columns(conn: Connection, table: sa.Table, names: tuple[str, ...]) -> None:
    """ALTER TABLE ... ADD COLUMN for each of `names` the table lacks (migration 1 creates tables
    from today's definitions, which have them already)."""
    have = {c["name"] for c in sa.inspect(conn).get_columns(table.name)}
    for name in names:
        if name in have:
            continue
        column = table.c[name]
        ddl = f"ALTER TABLE {table.name} ADD COLUMN {name} {column.type.compile(dialect=conn.dialect)}"
        if column.server_default is not None:
            ddl += f" NOT NULL DEFAULT {column.server_default.arg}"  # type: ignore[attr-defined]
        conn.execute(sa.text(ddl))


# The attributes the state machine read when migration 11 was written (lifecycle.as_read): frozen
# here, since a released migration never changes.
_V11_READ_ATTRIBUTES = re.compile(r"^(old-state|new-state|nic\.\d+\.(mac|ip))$")
_V11_PAGE = 2000


def _migration_11(conn: Connection) -> None:
    """Events stored before kept the whole payload twice (raw, and every other key again in the
    normalized event's attributes): keep the normalized part the state machine reads, and move
    a differing Kafka key (the `kafka_key` attribute) to record_key. In pages, by id."""
    _add_missing_columns(conn, lifecycle_events, ("record_key",))
    ev = lifecycle_events.c
    update = (
        sa.update(lifecycle_events)
        .where(ev.id == sa.bindparam("row_id"))
        .values(normalized=sa.bindparam("slim"), record_key=sa.bindparam("key"))
    )
    after = 0
    while True:
        page = conn.execute(
            sa.select(ev.id, ev.normalized).where(ev.id > after).order_by(ev.id).limit(_V11_PAGE)
        ).all()
        if not page:
            return
        after = int(page[-1][0])
        changed = []
        for row in page:
            row_id, event = row[0], pb.LifecycleEvent.FromString(bytes(row[1]))
            kept = {k: v for k, v in event.attributes.items() if _V11_READ_ATTRIBUTES.match(k)}
            if len(kept) == len(event.attributes):
                continue
            key = event.attributes.get("kafka_key")
            event.attributes.clear()
            event.attributes.update(kept)
            slim = event.SerializeToString(deterministic=True)
            changed.append({"row_id": row_id, "slim": slim, "key": key.encode() if key else None})
        if changed:
            conn.execute(update, changed)


def _migration_12(conn: Connection) -> None:
    _add_missing_columns(conn, dead_letters, ("record_key", "retries", "retried_ms", "resolved_ms"))


def _migration_27(conn: Connection) -> None:
    # The hand-off's per-record order and the webhook's refusals (store/outbox.py claim_outbox).
    _add_missing_columns(conn, handoff_outbox, ("record", "version", "webhook_refused_ms"))
    schema_outbox.migrate_27(conn, handoff_outbox)


def _migration_28(conn: Connection) -> None:
    # The refused items' next offer (a growing pause) and their index (store/outbox.py pick_free).
    _add_missing_columns(conn, handoff_outbox, ("webhook_retry_ms",))
    schema_outbox.migrate_28(conn, handoff_outbox)


def _migration_29(conn: Connection) -> None:
    # The topic's pending rows, by id (store/outbox.py pick_free).
    schema_outbox.migrate_29(conn, handoff_outbox)


def _migration_14(conn: Connection) -> None:
    _add_missing_columns(conn, usage_records, ("version",))
    _add_missing_columns(conn, usage_adjustments, ("version", "seq"))
    schema_outbox.migrate(
        conn, usage_records, usage_adjustments, collector_state, handoff_outbox, KEY_COLUMNS
    )


def _migration_15(conn: Connection) -> None:
    from kvmeter.collector.schema_retention import migration_15  # its tables live there

    migration_15(conn)


def _migration_17(conn: Connection) -> None:
    schema_policy.migrate(conn, billing_policies, (lifecycle_events, usage_records))


def _migration_19(conn: Connection) -> None:
    from kvmeter.collector import schema_item_costs  # their tables live there
    from kvmeter.collector.schema_versions import migration_19

    migration_19(conn)
    schema_item_costs.create(conn)


def _migration_23(conn: Connection) -> None:
    # Migration 19 first shipped without handoff_item_costs (it was added to 19 later): a store
    # that had 19 then never got the table. Idempotent: every other store has it already.
    from kvmeter.collector import schema_item_costs

    schema_item_costs.create(conn)


def _migration_24(conn: Connection) -> None:
    # Lifecycle events get a seq in commit order (store/sequence.py); those stored before it
    # take their id, the order they were read in until now.
    _add_missing_columns(conn, lifecycle_events, ("seq",))
    ev = lifecycle_events.c
    if conn.dialect.name == "postgresql":
        # One rewrite of the table, not an UPDATE of every row: the ADD COLUMN holds the table
        # (ACCESS EXCLUSIVE: every replica's event reads and writes wait) until the migrations
        # commit, and the rewrite takes a third of the UPDATE's time or less (1M events: 5.5-7 s,
        # not 17-45; README, benchmark 5d) and leaves no dead copy of each row behind.
        conn.execute(
            sa.text("ALTER TABLE lifecycle_events ALTER COLUMN seq TYPE BIGINT USING COALESCE(seq, id)")
        )
    else:
        conn.execute(sa.update(lifecycle_events).where(ev.seq.is_(None)).values(seq=ev.id))
    conn.execute(
        sa.text("CREATE UNIQUE INDEX IF NOT EXISTS ix_lifecycle_events_seq ON lifecycle_events (seq)")
    )
    state = collector_state.c
    if conn.execute(sa.select(state.name).where(state.name == EVENT_SEQ)).first() is None:
        top = conn.execute(sa.select(sa.func.coalesce(sa.func.max(ev.seq), 0))).scalar()
        conn.execute(sa.insert(collector_state).values(name=EVENT_SEQ, value=int(top or 0)))


MIGRATIONS = [
    (1, _migration_1), (2, _migration_2), (3, _migration_3), (4, _migration_4), (5, _migration_5),
    (6, _migration_6), (7, _migration_7), (8, _migration_8), (9, _migration_9), (10, _migration_10),
    (11, _migration_11), (12, _migration_12), (14, _migration_14), (15, _migration_15),
    (16, schema_credits.migration_16), (17, _migration_17), (18, schema_credits.migration_18),
    (19, _migration_19),
    (22, schema_residency.migration_22), (23, _migration_23), (24, _migration_24),
    (25, schema_credits.migration_25), (26, schema_credits.migration_26), (27, _migration_27),
    (28, _migration_28), (29, _migration_29),
    (30, schema_credits.migration_30),
]  # fmt: skip
