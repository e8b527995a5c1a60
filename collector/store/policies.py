"""The billing policy a store's records follow (the billing_policies table, migration 17).

    last_policy(conn) -> Previous | None                     # the one recorded last
    policy_in_force(conn, policy, now_ms) -> Previous | None
    note_policy(store, policy, now_ms) -> Previous | None   # the same, logged (a new store)

The store's records follow the policy recorded last: a changed one is recorded once every
resource is recomputed under it (collector/policy_change.py), so a start under another policy
than the last recorded knows its records still follow that one.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from kvmeter.collector.policy import BillingPolicy
from kvmeter.collector.schema import billing_policies

log = logging.getLogger(__name__)


class Previous(NamedTuple):
    policy: str  # BillingPolicy.describe() of the policy before
    since_ms: int  # in force since then (0: since the store began)


def last_policy(conn: Connection) -> Previous | None:
    """The policy recorded last and since when (None: a new store)."""
    bp = billing_policies.c
    last = conn.execute(sa.select(bp.policy, bp.since_ms).order_by(bp.id.desc()).limit(1)).first()
    return None if last is None else Previous(str(last[0]), int(last[1]))


def policy_in_force(conn: Connection, policy: BillingPolicy, now_ms: int) -> Previous | None:
    """Record `policy` as the one in force from now_ms unless it already is; the one before when
    it was another (None on a new store and when unchanged)."""
    last = last_policy(conn)
    if last is not None and last.policy == policy.describe():
        return None
    conn.execute(sa.insert(billing_policies).values(policy=policy.describe(), since_ms=now_ms))
    return last


def note_policy(store: Any, policy: BillingPolicy, now_ms: int) -> Previous | None:
    """At a start on `store` (a Store): record the policy in force; a warning when it changed."""
    with store.write() as conn:
        previous = policy_in_force(conn, policy, now_ms)
    if previous is not None:
        since = "the store began" if previous.since_ms <= 0 else f"{previous.since_ms} ms since the epoch"
        log.warning(
            "billing policy changed: records so far follow %s (since %s); from now on %s. Records written "
            "before keep it until recomputed (final ones never are): `kvmeter rebuild` into a fresh store "
            "bills the past under this one",
            previous.policy, since, policy.describe(),
        )  # fmt: skip
    return previous
