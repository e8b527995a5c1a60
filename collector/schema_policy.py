"""The billing policies a store's records were computed under (migration 17): one row each time
a collector starts on the store under another [policy] than the last one (collector/policy.py),
so that a changed policy is told, with what it changes and what it does not (store/policies.py).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
# The default policy as migration 17 wrote it (BillingPolicy.describe() then): frozen here, since a
# released migration never changes.
V17_DEFAULT = (
    "allocated_from=create allocated_until=destroy running=usage_and_state ip_from=assign ip_until=release"
)


def policies_table(metadata: sa.MetaData) -> sa.Table:
    return sa.Table(
        "billing_policies",
        metadata,
        sa.Column("id", _id, primary_key=True, autoincrement=True),
        sa.Column("policy", sa.String(200), nullable=False),  # BillingPolicy.describe()
        sa.Column("since_ms", sa.BigInteger, nullable=False),
    )


def migrate(conn: Connection, policies: sa.Table, used: tuple[sa.Table, ...]) -> None:
    """The table; a store that already holds events or records got them under the only policy
    there was, the default (since 0): a later start under another policy is then told."""
    policies.create(conn, checkfirst=True)
    if any(conn.execute(sa.select(sa.literal(1)).select_from(t).limit(1)).first() for t in used):
        conn.execute(sa.insert(policies).values(policy=V17_DEFAULT, since_ms=0))
