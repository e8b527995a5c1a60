"""The hand-off's tables (migration 14): the outbox of billable items, and what stable
transaction ids and ordered paging of adjustments need of the usage tables.

usage_records.version counts the adjustments of a record (0 when it is finalized); each
adjustment row keeps the version it made (1, 2, ...). A billable item's transaction id is
derived from its key and that version (collector/transaction_ids.py). usage_adjustments.seq is
assigned in commit order (store/sequence.py), so /v1/adjustments pages by it without ever
stepping over a row another replica committed late.
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa

from kvmeter.collector import billable

_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
ADJUSTMENT_SEQ = "adjustment_seq"  # collector_state: the last seq given to an adjustment


def outbox_table(metadata: sa.MetaData) -> sa.Table:
    """One row per billable item, written in the transaction that finalized the record or made
    the adjustment. A sink's column is set once that sink confirmed the item; sent_ms once every
    configured sink has. claimed_until_ms: a relay's lease (another relay skips the row until
    then; a relay killed mid-delivery lets it lapse and the row is sent again)."""
    table = sa.Table(
        "handoff_outbox",
        metadata,
        sa.Column("id", _id, primary_key=True, autoincrement=True),
        sa.Column("transaction_id", sa.String(64), nullable=False, unique=True),
        sa.Column("account", sa.String(64), nullable=False),
        sa.Column("item", sa.Text, nullable=False),  # the billable item as JSON
        sa.Column("created_ms", sa.BigInteger, nullable=False),
        sa.Column("topic_sent_ms", sa.BigInteger, nullable=True),
        sa.Column("webhook_sent_ms", sa.BigInteger, nullable=True),
        sa.Column("sent_ms", sa.BigInteger, nullable=True),
        sa.Column("claimed_until_ms", sa.BigInteger, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text, nullable=True),
        # migration 27: the item's record (billable.record_of) and version, so that a sink gets a
        # record's versions in order; when the webhook last refused the item (NULL: never)
        sa.Column("record", sa.String(36), nullable=True),
        sa.Column("version", sa.Integer, nullable=True),
        sa.Column("webhook_refused_ms", sa.BigInteger, nullable=True),
        # migration 28: when the webhook is offered a refused item again (NULL: never refused)
        sa.Column("webhook_retry_ms", sa.BigInteger, nullable=True),
    )
    sa.Index("ix_handoff_outbox_pending", table.c.sent_ms, table.c.id)
    sa.Index("ix_handoff_outbox_record", table.c.record, table.c.version)
    webhook_index(table)
    topic_index(table)
    return table


def webhook_index(table: sa.Table) -> sa.Index:
    """The rows the webhook lacks, in the order a claim offers them (store/outbox.py pick_free):
    those never refused (no retry time) by id, then the refused by when they are due. A claim
    reads what it takes and stops, however many refused rows wait (it walked, then sorted, every
    pending row)."""
    c = table.c
    lacking = sa.and_(c.sent_ms.is_(None), c.webhook_sent_ms.is_(None))
    return sa.Index(
        "ix_handoff_outbox_webhook", c.webhook_retry_ms, c.id, sqlite_where=lacking, postgresql_where=lacking
    )


def topic_index(table: sa.Table) -> sa.Index:
    """The rows the topic lacks, by id (migration 29): the topic's pick reads what it takes and
    stops. Without it, when the topic had every pending row and the webhook lacked them (a webhook
    down, or refusing most items), the pick walked every pending row to find none. topic_sent_ms
    leads (NULL in every row) so that SQLite, without statistics, matches the pick's term to it."""
    c = table.c
    lacking = sa.and_(c.sent_ms.is_(None), c.topic_sent_ms.is_(None))
    return sa.Index(
        "ix_handoff_outbox_topic", c.topic_sent_ms, c.id, sqlite_where=lacking, postgresql_where=lacking
    )


def migrate_27(conn: Any, outbox: sa.Table) -> None:
    """Migration 27's data: the record and version of each pending item, read from its JSON
    (the rows sent need none: only pending rows hold back a later version)."""
    ob = outbox.c
    query = sa.select(ob.id, ob.item).where(ob.sent_ms.is_(None), ob.record.is_(None))
    changed = []
    for row_id, text in conn.execute(query).all():
        item = json.loads(text)
        changed.append({"row_id": row_id, "r": billable.record_of(item), "v": int(item["version"])})
    if changed:
        update = sa.update(outbox).where(ob.id == sa.bindparam("row_id"))
        conn.execute(update.values(record=sa.bindparam("r"), version=sa.bindparam("v")), changed)
    conn.execute(
        sa.text("CREATE INDEX IF NOT EXISTS ix_handoff_outbox_record ON handoff_outbox (record, version)")
    )


def migrate_28(conn: Any, outbox: sa.Table) -> None:
    """Migration 28's data: an item refused before it is due again at once (as it was, the least
    recently refused first), then the index of the webhook's pending rows. Only pending refused
    rows are written; the index reads the table once, in the migrations' transaction (on
    PostgreSQL under the ADD COLUMN's lock: 0.2 s at 1,000,000 rows, README, benchmark 5e)."""
    ob = outbox.c
    conn.execute(
        sa.update(outbox)
        .where(ob.sent_ms.is_(None), ob.webhook_refused_ms.is_not(None), ob.webhook_retry_ms.is_(None))
        .values(webhook_retry_ms=ob.webhook_refused_ms)
    )
    index = next(i for i in outbox.indexes if i.name == "ix_handoff_outbox_webhook")
    index.create(conn, checkfirst=True)


def migrate_29(conn: Any, outbox: sa.Table) -> None:
    """Migration 29: the index of the topic's pending rows. It reads the table once, in the
    migrations' transaction (on PostgreSQL a SHARE lock: the outbox's writers wait that long)."""
    index = next(i for i in outbox.indexes if i.name == "ix_handoff_outbox_topic")
    index.create(conn, checkfirst=True)


def version_column() -> sa.Column[Any]:
    return sa.Column("version", sa.Integer, nullable=False, server_default="0")


def seq_column() -> sa.Column[Any]:
    return sa.Column("seq", sa.BigInteger, nullable=True)


def migrate(
    conn: Any,
    records: sa.Table,
    adjustments: sa.Table,
    state: sa.Table,
    outbox: sa.Table,
    key: tuple[str, ...],
) -> None:
    """Migration 14's data: versions and seqs of the adjustments made before it (versions in the
    order they were made, per key; seq = id, which was their order), each record's version =
    its number of adjustments, the seq counter, and the outbox table. Items finalized before
    the migration are not put in the outbox: /v1/usage and /v1/adjustments list them."""
    adj = adjustments.c
    set_version = (
        sa.update(adjustments).where(adj.id == sa.bindparam("row_id")).values(version=sa.bindparam("v"))
    )
    rec = records.c
    set_record = (
        sa.update(records)
        .where(*(rec[c] == sa.bindparam(f"k_{c}") for c in key))
        .values(version=sa.bindparam("v"))
    )
    counts: dict[tuple[Any, ...], int] = {}
    changed = []
    query = sa.select(adj.id, *(adj[c] for c in key)).order_by(*(adj[c] for c in key), adj.id)
    for row in conn.execute(query):
        k = tuple(row[1:])
        counts[k] = counts.get(k, 0) + 1
        changed.append({"row_id": row[0], "v": counts[k]})
    if changed:
        conn.execute(set_version, changed)
        conn.execute(
            set_record,
            [{"v": n, **{f"k_{c}": v for c, v in zip(key, k, strict=True)}} for k, n in counts.items()],
        )
    conn.execute(sa.update(adjustments).where(adj.seq.is_(None)).values(seq=adj.id))
    conn.execute(
        sa.text("CREATE UNIQUE INDEX IF NOT EXISTS ix_usage_adjustments_seq ON usage_adjustments (seq)")
    )
    top = conn.execute(sa.select(sa.func.coalesce(sa.func.max(adj.seq), 0))).scalar()
    have = conn.execute(sa.select(state.c.name).where(state.c.name == ADJUSTMENT_SEQ)).first()
    if have is None:
        conn.execute(sa.insert(state).values(name=ADJUSTMENT_SEQ, value=int(top or 0)))
    outbox.create(conn, checkfirst=True)
