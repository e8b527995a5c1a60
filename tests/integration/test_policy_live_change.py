"""A billing policy changed while running (SIGHUP: collector/policy_change.put_in_force) or
between two starts (put_in_force_at_start) is put in force over the whole store at once, on both
databases: afterwards the net usage (records and adjustments) equals that of a store built from
the same events under the new policy alone, so no window keeps the old policy's quantity; the
change is kept in billing_policies, recorded only once every resource is recomputed (a start cut
short midway is finished by the next one)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import sqlalchemy as sa

from kvmeter.collector.model import Record, Settings, UsageKey
from kvmeter.collector.policy import BillingPolicy
from kvmeter.collector.policy_change import put_in_force, put_in_force_at_start
from kvmeter.collector.schema import billing_policies
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store
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


def under_new_policy_alone(tmp_path: Path, now_ms: int) -> dict[UsageKey, int]:
    """The net usage of a fresh store given the same events under NEW, ticked as the live one."""
    return under_alone(tmp_path, events(), Settings(policy=NEW), T0 + 4 * HOUR, now_ms)


def under_alone(
    tmp_path: Path, records: list[Record], settings: Settings, applied_ms: int, now_ms: int
) -> dict[UsageKey, int]:
    """The oracle of a policy change: the net usage of a fresh store given `records` at
    `applied_ms` under `settings` alone, ticked then and at `now_ms`."""
    fresh_store = Store(f"sqlite:///{tmp_path}/fresh.db")
    fresh_store.migrate()
    fresh_clock = Clock(applied_ms)
    fresh = Collector(fresh_store, settings, fresh_clock)
    fresh.apply_events(records)
    fresh.tick()
    fresh_clock.now = now_ms
    fresh.tick()
    want = net(fresh_store)
    fresh_store.close()
    return want


def run_under_default(store: Store, clock: Clock) -> Collector:
    """The events under the default policy, the first hours final by the second tick."""
    live = Collector(store, Settings(), clock)
    put_in_force_at_start(live)
    live.apply_events(events())
    live.tick()
    clock.now = T0 + 8 * HOUR  # the first hours final: a change must adjust them
    live.tick()
    return live


@pytest.mark.parametrize("per_pass", [200, 2])  # one transaction, or a page of 2 resources each
def test_a_live_change_gives_the_new_policys_records_everywhere(
    store: Store, tmp_path: Path, per_pass: int
) -> None:
    clock = Clock(T0 + 4 * HOUR)
    live = run_under_default(store, clock)
    before = net(store)

    if per_pass == 200:
        summary = put_in_force(live, NEW)  # as SIGHUP does: recorded, warned of, recomputed
        found = re.search(r"\((\d+) record\(s\), (\d+) adjustment\(s\)\)$", summary)
        assert found is not None, summary
        assert int(found.group(2)) > 0  # final windows were adjusted
    else:
        live.set_policy(NEW, per_pass=per_pass)
    live.tick()

    assert net(store) == under_new_policy_alone(tmp_path, clock.now)
    assert net(store) != before  # the policies differ for these VMs
    kept = recorded(store)
    assert kept[-1] == (NEW.describe() if per_pass == 200 else Settings().policy.describe())
    assert put_in_force(live, NEW).startswith("unchanged")


def recorded(store: Store) -> list[str]:
    with store.read() as conn:
        return [
            r[0] for r in conn.execute(sa.select(billing_policies.c.policy).order_by(billing_policies.c.id))
        ]


def test_a_start_under_a_changed_policy_recomputes_the_whole_store(store: Store, tmp_path: Path) -> None:
    clock = Clock(T0 + 4 * HOUR)
    run_under_default(store, clock)
    before = net(store)

    restarted = Collector(store, Settings(policy=NEW), clock)  # the config's [policy] changed
    summary = put_in_force_at_start(restarted)
    found = re.search(r"\((\d+) record\(s\), (\d+) adjustment\(s\)\)$", summary)
    assert found is not None, summary
    assert int(found.group(2)) > 0  # final windows were adjusted
    restarted.tick()
    assert net(store) == under_new_policy_alone(tmp_path, clock.now) != before
    assert recorded(store) == [Settings().policy.describe(), NEW.describe()]

    again = Collector(store, Settings(policy=NEW), clock)  # started again unchanged: nothing
    assert put_in_force_at_start(again) == f"policy {NEW.describe()}"
    assert len(recorded(store)) == 2


def test_a_start_cut_short_midway_is_finished_by_the_next(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock(T0 + 4 * HOUR)
    run_under_default(store, clock)
    before = net(store)

    cut = Collector(store, Settings(policy=NEW), clock)
    passes = []
    real = cut._recompute

    def failing_second_page(*args: object) -> object:
        passes.append(args)
        if len(passes) == 2:
            raise sa.exc.OperationalError("UPDATE", {}, Exception("the store went away"))
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(cut, "_recompute", failing_second_page)
    monkeypatch.setattr(cut, "recompute_all", lambda per_pass=2: Collector.recompute_all(cut, per_pass))
    with pytest.raises(sa.exc.OperationalError):
        put_in_force_at_start(cut)
    assert net(store) != before  # the first page was recomputed and committed ...
    assert recorded(store) == [Settings().policy.describe()]  # ... but the change not recorded

    restarted = Collector(store, Settings(policy=NEW), clock)
    put_in_force_at_start(restarted)  # so the next start recomputes again, all of it
    restarted.tick()
    assert net(store) == under_new_policy_alone(tmp_path, clock.now)
    assert recorded(store)[-1] == NEW.describe()
