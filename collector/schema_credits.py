"""Credits, balances and low-balance alerts (migration 16): a table family of its own.

credits          money added to an account (operator only), never changed: a correction is
                 another credit; amounts are exact decimal text, summed as Decimal
balance_state    per account, whether its balance was below its threshold at the last
                 evaluation: the alert fires on the change to below, once per crossing,
                 whichever replica evaluates
balance_alerts   one row per crossing, written with the state change: the webhook's outbox
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

metadata = sa.MetaData()
_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite autoincrements INTEGER PKs only
MONEY = sa.String(48)  # a Decimal's text: exact on both stores

credits = sa.Table(
    "credits",
    metadata,
    sa.Column("id", _id, primary_key=True, autoincrement=True),
    sa.Column("account", sa.String(64), nullable=False, index=True),
    sa.Column("amount", MONEY, nullable=False),
    sa.Column("currency", sa.String(8), nullable=False),
    sa.Column("note", sa.String(500), nullable=False, server_default=""),
    sa.Column("created_by", sa.String(128), nullable=False, server_default=""),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
)

balance_state = sa.Table(
    "balance_state",
    metadata,
    sa.Column("account", sa.String(64), primary_key=True),
    sa.Column("below", sa.Boolean, nullable=False),
    sa.Column("balance", MONEY, nullable=False),
    sa.Column("threshold", MONEY, nullable=False),
    sa.Column("currency", sa.String(8), nullable=False),
    sa.Column("evaluated_ms", sa.BigInteger, nullable=False),
)

balance_alerts = sa.Table(
    "balance_alerts",
    metadata,
    sa.Column("id", _id, primary_key=True, autoincrement=True),
    sa.Column("account", sa.String(64), nullable=False),
    sa.Column("balance", MONEY, nullable=False),
    sa.Column("threshold", MONEY, nullable=False),
    sa.Column("currency", sa.String(8), nullable=False),
    sa.Column("crossed_ms", sa.BigInteger, nullable=False),
    sa.Column("delivered_ms", sa.BigInteger),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Index("ix_balance_alerts_undelivered", "delivered_ms", "id"),
)


def migration_16(conn: Connection) -> None:
    for table in (credits, balance_state, balance_alerts):
        table.create(conn, checkfirst=True)
