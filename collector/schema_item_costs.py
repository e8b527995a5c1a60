"""Where the costs of billable items stand, per account and month (created by migration 19).

Each billable item carries its cost (store/item_costs.py): its step in the account's rounded
running total over the month, in the order the items were made. This row is that running total
(exact, money.Scaled, as decimal text) and the account's monthly byte tier counters after the
last item made, so the next item continues from them whichever replica makes it.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from kvmeter.collector.schema import metadata

item_costs = sa.Table(
    "handoff_item_costs",
    metadata,
    sa.Column("account", sa.String(64), primary_key=True),
    sa.Column("month_start_ms", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("total_scaled", sa.Text, nullable=False),  # exact amount x 3,600,000 (money.Scaled)
    sa.Column("counters", sa.Text, nullable=False),  # JSON [[usage type, traffic type, zone, bytes]]
    sa.Column("currency", sa.String(16), nullable=False),
    sa.Column("updated_ms", sa.BigInteger, nullable=False),
)


def create(conn: Connection) -> None:
    item_costs.create(conn, checkfirst=True)
