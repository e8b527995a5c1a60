"""Credits, balances and low-balance alerts (migration 16): a table family of its own.

credits          money added to an account (operator only), never changed: a correction is
                 another credit; amounts are exact decimal text, summed as Decimal; the
                 caller's idempotency key, when it gave one, is unique per account (migration
                 25), so a retried request adds its credit once, whichever replica takes it;
                 by (currency, account) (migration 30), so a first credit's check reads
                 only the credits of accounts holding one in another currency
balance_state    per account, whether its balance was below its threshold at the last
                 evaluation: the alert fires on the change to below, once per crossing,
                 whichever replica evaluates
balance_alerts   one row per crossing, written with the state change: the webhook's outbox;
                 (account, crossing) is unique (migration 18), so two replicas that both took
                 the same fall for theirs write one alert between them; its webhook's
                 Idempotency-Key is stored with it, and its last attempt's instant orders
                 the delivery rounds (migration 26)
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

metadata = sa.MetaData()
_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite autoincrements INTEGER PKs only
MONEY = sa.String(48)  # a Decimal's text: exact on both stores
KEY_MAX = 128  # characters of a credit's idempotency key (credit_keys)

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
    sa.Column("idempotency_key", sa.String(KEY_MAX)),  # migration 25; NULL: none given
    sa.Index("ux_credits_idempotency_key", "account", "idempotency_key", unique=True),
    sa.Index("ix_credits_currency", "currency", "account"),  # migration 30
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
    sa.Column("crossings", sa.Integer, nullable=False, server_default="0"),  # so far (migration 18)
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
    sa.Column("crossing", sa.Integer),  # the account's n-th (migration 18; NULL: raised before it)
    # NULL: raised before migration 26, POSTed as kvmeter-balance-alert-<id> (kept: it may have been)
    sa.Column("idempotency_key", sa.String(80)),
    sa.Column("tried_ms", sa.BigInteger),  # the last attempt (NULL: never): a round takes the least recent
    sa.Index("ix_balance_alerts_undelivered", "delivered_ms", "id"),
    sa.Index("ux_balance_alerts_crossing", "account", "crossing", unique=True),
)


def migration_16(conn: Connection) -> None:
    for table in (credits, balance_state, balance_alerts):
        table.create(conn, checkfirst=True)


def migration_18(conn: Connection) -> None:
    """Crossings numbered per account, an alert unique per (account, crossing). Alerts already
    raised keep a NULL number (NULLs never collide in a unique index, on either database)."""
    have = {
        table.name: {c["name"] for c in sa.inspect(conn).get_columns(table.name)}
        for table in (balance_state, balance_alerts)
    }
    if "crossings" not in have["balance_state"]:
        conn.execute(sa.text("ALTER TABLE balance_state ADD COLUMN crossings INTEGER NOT NULL DEFAULT 0"))
    if "crossing" not in have["balance_alerts"]:
        conn.execute(sa.text("ALTER TABLE balance_alerts ADD COLUMN crossing INTEGER"))
    unique = (
        "CREATE UNIQUE INDEX IF NOT EXISTS ux_balance_alerts_crossing ON balance_alerts (account, crossing)"
    )
    conn.execute(sa.text(unique))


def migration_25(conn: Connection) -> None:
    """Credits' idempotency keys, unique per account. Credits added before have none (NULLs
    never collide in a unique index, on either database)."""
    if "idempotency_key" not in {c["name"] for c in sa.inspect(conn).get_columns(credits.name)}:
        conn.execute(sa.text(f"ALTER TABLE credits ADD COLUMN idempotency_key VARCHAR({KEY_MAX})"))
    unique = (
        "CREATE UNIQUE INDEX IF NOT EXISTS ux_credits_idempotency_key ON credits (account, idempotency_key)"
    )
    conn.execute(sa.text(unique))


def migration_26(conn: Connection) -> None:
    """Each alert's Idempotency-Key stored with it, and its last attempt's instant. Alerts
    already raised keep a NULL key: theirs stays the one they may have been POSTed with
    already (balance_watch.idempotency_key)."""
    have = {c["name"] for c in sa.inspect(conn).get_columns("balance_alerts")}
    if "idempotency_key" not in have:
        conn.execute(sa.text("ALTER TABLE balance_alerts ADD COLUMN idempotency_key VARCHAR(80)"))
    if "tried_ms" not in have:
        conn.execute(sa.text("ALTER TABLE balance_alerts ADD COLUMN tried_ms BIGINT"))


def migration_30(conn: Connection) -> None:
    """Credits by currency: a first credit's check (credit_keys.currency_refused) and a tariff's
    read the accounts holding credits in another currency, not the whole table."""
    conn.execute(sa.text("CREATE INDEX IF NOT EXISTS ix_credits_currency ON credits (currency, account)"))
