"""The billing policies a store's records followed (migration 17), on both databases: a start
under another policy than the last is told; a store migrated with events in it followed the
default."""

from __future__ import annotations

import logging

import pytest
import sqlalchemy as sa

from kvmeter.collector import store as store_mod
from kvmeter.collector.model import Settings
from kvmeter.collector.policy import DEFAULT_POLICY, BillingPolicy
from kvmeter.collector.schema import billing_policies
from kvmeter.collector.schema_policy import V17_DEFAULT
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store, policies
from tests.collector_support import ACCT_A, T0, VM1, Clock, usage_event

STATE = BillingPolicy(running="state")


def test_a_new_store_records_the_first_policy_and_each_change(store: Store) -> None:
    with store.write() as conn:
        assert policies.policy_in_force(conn, STATE, 10) is None  # a new store: nothing before
        assert policies.policy_in_force(conn, STATE, 20) is None  # unchanged
        assert policies.policy_in_force(conn, DEFAULT_POLICY, 30) == (STATE.describe(), 10)
        assert policies.policy_in_force(conn, DEFAULT_POLICY, 40) is None
        rows = conn.execute(sa.select(billing_policies.c.policy, billing_policies.c.since_ms)).all()
    assert [tuple(r) for r in rows] == [(STATE.describe(), 10), (DEFAULT_POLICY.describe(), 30)]


def test_a_store_with_records_before_migration_17_followed_the_default(
    store: Store, store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    k, v = usage_event("VM.CREATE", VM1, ACCT_A, T0)
    Collector(store, Settings(), Clock(T0)).apply_event(v, k)
    with store.write() as conn:  # make it what a store before migration 17 looked like
        conn.execute(sa.text("DROP TABLE billing_policies"))
        conn.execute(sa.delete(store_mod.schema_version).where(store_mod.schema_version.c.version == 17))
    store.close()
    upgraded = Store(store_url)
    try:
        upgraded.migrate()
        with caplog.at_level(logging.WARNING, logger="kvmeter.collector.store.policies"):
            assert policies.note_policy(upgraded, STATE, T0) == (V17_DEFAULT, 0)
        assert "billing policy changed: records so far follow allocated_from=create" in caplog.text
        assert "`kvmeter rebuild` into a fresh store bills the past under this one" in caplog.text
        assert policies.note_policy(upgraded, STATE, T0 + 1) is None
    finally:
        upgraded.close()


def test_the_frozen_default_is_todays() -> None:
    assert V17_DEFAULT == DEFAULT_POLICY.describe()
