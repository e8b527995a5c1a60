"""The billing policy at its edges: pruning under the policy a SIGHUP put in force, a reload that
reopens a resource out of memory, a reload cut short, an expunge under running = "usage", a stop
stamped ahead of the collector's clock."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa

import kvmeter.agent.cli
from kvmeter.collector.lifecycle import build_history
from kvmeter.collector.model import ALLOCATED_VM, RUNNING_VM, Record, Segment, Settings, UsageKey
from kvmeter.collector.policy import BillingPolicy
from kvmeter.collector.policy_change import put_in_force, put_in_force_at_start
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store, policies
from kvmeter.pipeline import allinone
from kvmeter.reload import Reloads
from tests.collector_support import ACCT_A, HOUR, MIN, T0, VM1, Clock, usage_event
from tests.integration.test_policy_live_change import net, under_alone
from tests.unit.cs_events import T0 as CS_T0
from tests.unit.cs_events import VM, A, H, state, usage

DAY = 24 * HOUR


def _all_in_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: Clock, extra: str = "") -> Any:
    """An all-in-one from TOML (its agent stubbed), retention of lifecycle events 2 days."""
    monkeypatch.setattr(
        kvmeter.agent.cli,
        "build_agent",
        lambda _cfg, *, read_only, producer_factory: SimpleNamespace(set_traffic_rules=lambda _r: None),
    )
    config = tmp_path / "allinone.toml"
    config.write_text(
        f'[store]\nurl = "sqlite:///{tmp_path}/usage.db"\n[api]\nenabled = false\n'
        f'[agent]\nstate_dir = "{tmp_path}/agent"\n[lifecycle]\nevents_file = "events.jsonl"\n'
        "[retention]\nlifecycle_events_days = 2\n" + extra
    )
    return allinone.AllInOne(allinone.load(config), clock=clock)


def test_pruning_follows_the_policy_put_in_force_on_sighup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGHUP that puts allocated_until = "expunge" in force leaves a destroyed, not yet
    expunged VM allocated (billed on). The periodic pruning pass must judge histories closed under
    that policy too, not under the one configured at start: else it prunes the VM's events as
    closed at its destroy and the allocation the policy bills stops being billed (a restart
    bills no more ALLOCATED time for it)."""
    (tmp_path / "events.jsonl").write_bytes(
        b"".join(
            usage_event(e, VM1, ACCT_A, T0 + at)[1] + b"\n"
            for e, at in (("VM.CREATE", 0), ("VM.START", 0), ("VM.STOP", HOUR), ("VM.DESTROY", HOUR))
        )
    )
    clock = Clock(T0 + 2 * HOUR)
    pipeline = _all_in_one(tmp_path, monkeypatch, clock)
    try:
        pipeline.idle()  # the events, received then
        clock.now = T0 + 10 * DAY
        pipeline.collector.tick()  # windows up to now final
        with (tmp_path / "allinone.toml").open("a") as f:
            f.write('[policy]\nallocated_until = "expunge"\n')
        assert allinone.reloads(str(tmp_path / "allinone.toml"), pipeline).run_all() == []
        assert pipeline.collector.settings.policy.allocated_until == "expunge"
        assert pipeline.pruning is not None
        pipeline.pruning.run_once()
    finally:
        pipeline.close()
    clock.now += 3 * HOUR  # a restart, later: the VM is still allocated under the policy
    pipeline = _all_in_one(tmp_path, monkeypatch, clock, '[policy]\nallocated_until = "expunge"\n')
    try:
        pipeline.idle()
        pipeline.collector.tick()
        rows = pipeline.store.usage(clock.now - HOUR, clock.now + HOUR, resource=VM1)
    finally:
        pipeline.close()
    window = clock.now - clock.now % HOUR
    allocated = {r.key.window_start_ms: r.quantity for r in rows if r.key.usage_type == ALLOCATED_VM}
    assert allocated.get(window - HOUR) == HOUR, allocated


def _vm_destroyed() -> list[Record]:
    return [
        Record(value, key)
        for key, value in (
            usage_event(e, VM1, ACCT_A, T0 + at)
            for e, at in (("VM.CREATE", 0), ("VM.START", 0), ("VM.STOP", HOUR), ("VM.DESTROY", HOUR))
        )
    ]


def _under_alone(tmp_path: Path, policy: BillingPolicy, now_ms: int) -> dict[UsageKey, int]:
    """The oracle: the net usage of a fresh store given the same events under `policy` alone."""
    return under_alone(
        tmp_path, _vm_destroyed(), Settings(grace_ms=HOUR, policy=policy), T0 + 2 * HOUR, now_ms
    )


def test_a_reload_bills_on_what_the_new_policy_opens_in_a_resource_out_of_memory(tmp_path: Path) -> None:
    """A VM destroyed two days ago has left memory (closed, evict_after_ms); a SIGHUP putting
    allocated_until = "expunge" in force reopens its allocation. Its ALLOCATED time must go on
    being billed window after window, as a collector started under that policy bills it
    (the rebuild oracle), not stop at the reload's instant until the VM's next event."""
    expunge = BillingPolicy(allocated_until="expunge")
    clock = Clock(T0 + 2 * HOUR)
    store = Store(f"sqlite:///{tmp_path}/live.db")
    store.migrate()
    live = Collector(store, Settings(grace_ms=HOUR), clock)
    live.apply_events(_vm_destroyed())
    live.tick()
    clock.now = T0 + 2 * DAY
    live.tick()
    assert VM1 not in live.histories  # closed a day and more ago: out of memory
    put_in_force(live, expunge)
    clock.now += 5 * HOUR + HOUR // 2
    live.tick()
    got = net(store)
    store.close()

    want = _under_alone(tmp_path, expunge, clock.now)
    allocated = sorted(k.window_start_ms for k in want if k.usage_type == ALLOCATED_VM)
    assert allocated[-1] == clock.now - clock.now % HOUR  # the fresh store bills up to now
    assert got == want


def test_a_reload_cut_short_is_finished_by_the_next_reload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGHUP whose recompute fails (the store went away) is refused, "the one in force
    stays": the old policy must stay in force, so that the next SIGHUP (same config) puts the
    new one in force over the whole store and records it, and not answer "unchanged" while the
    store's records still follow the old policy (until a restart)."""
    expunge = BillingPolicy(allocated_until="expunge")
    clock = Clock(T0 + 2 * HOUR)
    store = Store(f"sqlite:///{tmp_path}/live.db")
    store.migrate()
    live = Collector(store, Settings(grace_ms=HOUR), clock)
    put_in_force_at_start(live)
    live.apply_events(_vm_destroyed())
    live.tick()
    clock.now = T0 + 6 * HOUR
    live.tick()
    before = net(store)
    real = live._recompute
    calls: list[object] = []

    def failing_once(*args: object) -> object:
        calls.append(args)
        if len(calls) == 1:
            raise sa.exc.OperationalError("UPDATE", {}, Exception("the store went away"))
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(live, "_recompute", failing_once)
    reloads = Reloads()
    reloads.add("policy", lambda: put_in_force(live, expunge))
    assert reloads.run_all() == ["policy"]  # refused
    assert reloads.run_all() == []  # the SIGHUP again
    live.tick()
    assert net(store) != before
    assert net(store) == _under_alone(tmp_path, expunge, clock.now)
    with store.read() as conn:
        last = policies.last_policy(conn)
    assert last is not None
    assert last.policy == expunge.describe()
    store.close()


def test_an_expunge_closes_running_under_running_usage_too() -> None:
    """An expunge (a state event to Expunging) closes RUNNING under every policy: an expunged VM
    runs nowhere (README "Billing policy", collector/policy.py). Under running = "usage" with the
    VM's VM.STOP / VM.DESTROY lost (the bus is fire-and-forget), the VM must not stay billed as
    running after its expunge (as under allocated_until = "expunge" it is not)."""
    events = [usage("VM.CREATE", 0), usage("VM.START", 1), state("Running", "Expunging", 3)]
    policy = BillingPolicy(running="usage")  # allocated_until = "destroy"
    history = build_history(events, policy)[VM]
    assert history.running == [Segment(CS_T0 + H, CS_T0 + 3 * H, "", A)]


def test_a_stop_stamped_ahead_of_the_collectors_clock_is_billed_to_its_stamp(tmp_path: Path) -> None:
    """A VM.STOP / VM.DESTROY stamped ten minutes after the collector's clock when it arrives (a
    management server's clock ahead) closes RUNNING and ALLOCATED at its stamp: the windows still
    open must be billed to it (30 minutes here, as a rebuild later gives), not cut at the instant
    the event was applied (20 minutes) because no tick grows a closed segment."""
    clock = Clock(T0 + 20 * MIN)
    store = Store(f"sqlite:///{tmp_path}/live.db")
    store.migrate()
    live = Collector(store, Settings(grace_ms=HOUR), clock)
    stamped = (("VM.CREATE", 0), ("VM.START", 0), ("VM.STOP", 30 * MIN), ("VM.DESTROY", 30 * MIN))
    live.apply_events([Record(v, k) for k, v in (usage_event(e, VM1, ACCT_A, T0 + at) for e, at in stamped)])
    live.tick()
    clock.now = T0 + 3 * HOUR
    live.tick()  # the first window final now
    assert {(k.usage_type, k.window_start_ms): q for k, q in net(store).items()} == {
        (RUNNING_VM, T0): 30 * MIN,
        (ALLOCATED_VM, T0): 30 * MIN,
    }
    store.close()
