"""A billing policy changed while running (SIGHUP: collector/reloading.put_in_force) is put in
force over the whole store at once, on both databases: afterwards the net usage (records and
adjustments) equals that of a store built from the same events under the new policy alone, so
no window keeps the old policy's quantity; the change is kept in billing_policies."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import sqlalchemy as sa

from kvmeter.collector.model import Record, Settings, UsageKey
from kvmeter.collector.policy import BillingPolicy
from kvmeter.collector.reloading import put_in_force
from kvmeter.collector.schema import billing_policies
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store, policies
from tests.collector_support import ACCT_A, ACCT_B, HOUR, MIN, T0, Clock, usage_event

NEW = BillingPolicy(allocated_from="first_start", allocated_until="expunge")
VMS = [f"vm-{i}" for i in range(5)]


def events() -> list[Record]:
    out = []
    for i, vm in enumerate(VMS):
        owner = ACCT_A if i % 2 else ACCT_B
        at = T0 + i * 7 * MIN
        out += [usage_event("VM.CREATE", vm, owner, at), usage_event("VM.START", vm, owner, at + 40 * MIN)]
        if i < 3:
            out += [
                usage_event("VM.STOP", vm, owner, at + 2 * HOUR),
                usage_event("VM.DESTROY", vm, owner, at + 3 * HOUR),
            ]
    return [Record(value, key) for key, value in out]


def net(store: Store) -> dict[UsageKey, int]:
    return {r.key: r.quantity for r in store.usage(0, 2**62) if r.quantity}


@pytest.mark.parametrize("per_pass", [200, 2])  # one transaction, or a page of 2 resources each
def test_a_live_change_gives_the_new_policys_records_everywhere(
    store: Store, tmp_path: Path, per_pass: int
) -> None:
    clock = Clock(T0 + 4 * HOUR)
    live = Collector(store, Settings(), clock)
    policies.note_policy(store, live.settings.policy, clock())
    live.apply_events(events())
    live.tick()
    clock.now = T0 + 8 * HOUR  # the first hours final: a change must adjust them
    live.tick()
    before = net(store)

    if per_pass == 200:
        summary = put_in_force(live, NEW)  # as SIGHUP does: recorded, warned of, recomputed
        found = re.search(r"\((\d+) record\(s\), (\d+) adjustment\(s\)\)$", summary)
        assert found is not None, summary
        assert int(found.group(2)) > 0  # final windows were adjusted
    else:
        live.set_policy(NEW, per_pass=per_pass)
    live.tick()

    fresh_store = Store(f"sqlite:///{tmp_path}/fresh.db")
    fresh_store.migrate()
    fresh_clock = Clock(T0 + 4 * HOUR)
    fresh = Collector(fresh_store, Settings(policy=NEW), fresh_clock)
    fresh.apply_events(events())
    fresh.tick()
    fresh_clock.now = clock.now
    fresh.tick()
    want = net(fresh_store)
    fresh_store.close()

    assert net(store) == want
    assert net(store) != before  # the policies differ for these VMs
    with store.read() as conn:
        kept = [
            r[0] for r in conn.execute(sa.select(billing_policies.c.policy).order_by(billing_policies.c.id))
        ]
    assert kept[-1] == (NEW.describe() if per_pass == 200 else Settings().policy.describe())
    assert put_in_force(live, NEW).startswith("unchanged")
