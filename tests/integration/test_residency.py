"""Bounded memory: resources whose lifecycle closed long ago leave a replica's memory and come back
whole from the store when an event, a measure or the reconciler reads them again, so the records
are exactly those of a replica that kept everything (DESIGN.md, invariant 5)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmeter.collector.model import Record, Settings
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store, reconciliation
from kvmeter.collector.witness import Witness
from kvmeter.proto import pb
from tests.collector_support import ACCT_A, ACCT_B, HOUR, MIN, T0, ZONE, Clock, M, Stream, cs_time
from tests.harness import postgres

VM_RESOURCE = "com.cloud.vm.VirtualMachine"
IP_RESOURCE = "com.cloud.network.dao.IPAddressVO"
EVICTING = Settings(grace_ms=HOUR, park_horizon_ms=4 * HOUR, evict_after_ms=2 * HOUR)
KEEPING = replace(EVICTING, evict_after_ms=None)


def event(kind: str, resource: str, account: str, at: int, **extra: str) -> Record:
    doc = {
        "account": account,
        "zone": ZONE,
        "event": kind,
        "resource": IP_RESOURCE if kind.startswith("NET.") else VM_RESOURCE,
        "id": resource,
        "eventDateTime": cs_time(at),
        **extra,
    }
    return Record(json.dumps(doc, separators=(",", ":")).encode(), resource.encode(), f"test:{kind}")


def vm(i: int) -> str:
    return f"9b1f0000-0000-4000-8000-{i:012d}"


def mac(i: int) -> str:
    return f"02:00:00:00:{i >> 8 & 255:02x}:{i & 255:02x}"


def address(i: int) -> str:
    return f"198.51.{i >> 8 & 255}.{i & 255}"


def vm_life(i: int, at: int, account: str = ACCT_A) -> list[Record]:
    """Created, started, stopped and destroyed within the hour after `at`."""
    return [
        event("VM.CREATE", vm(i), account, at, macaddress=mac(i)),
        event("VM.START", vm(i), account, at + MIN),
        event("VM.STOP", vm(i), account, at + 40 * MIN),
        event("VM.DESTROY", vm(i), account, at + 50 * MIN),
    ]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.pg)])
def new_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Store]]:
    """Makes fresh, migrated stores of one kind (SQLite files or PostgreSQL databases)."""
    made: list[Store] = []

    def make() -> Store:
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path}/usage-{len(made)}.db"
        else:
            url = postgres.create_database(request.getfixturevalue("pg_dsn"))
        store = Store(url)
        store.migrate()
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def test_memory_stays_bounded_while_closed_resources_stream_through(new_store: Callable[[], Store]) -> None:
    clock = Clock(T0)
    kept = Collector(new_store(), KEEPING, clock)
    bounded = Collector(new_store(), EVICTING, clock)
    most = 0
    vms = 1500
    for first in range(0, vms, 50):  # 50 VMs every 10 minutes, each living under an hour
        clock.now = T0 + first // 50 * 10 * MIN
        records = [r for i in range(first, first + 50) for r in vm_life(i, clock.now - 55 * MIN)]
        for collector in (kept, bounded):
            collector.apply_events(records)
            collector.tick()
        most = max(most, bounded.resident)
    # About 3 h of VMs (the 2 h cutoff, the last hour's lives, a minute between passes): 1,000 of
    # 1,500 gone; the replica that keeps everything holds them all.
    assert kept.resident == vms
    assert most <= 21 * 50
    assert bounded.resident + len(bounded.evicted) == vms
    assert len(bounded.evicted) >= vms - 21 * 50
    assert sum(len(evs) for evs in bounded.events.values()) == 4 * bounded.resident
    assert bounded.store.net_usage() == kept.store.net_usage()


def test_an_event_of_an_evicted_resource_brings_it_back_whole(new_store: Callable[[], Store]) -> None:
    clock = Clock(T0 + HOUR)
    runs = [Collector(new_store(), s, clock) for s in (KEEPING, EVICTING)]
    for c in runs:
        c.apply_events(vm_life(1, T0))
    clock.now = T0 + 10 * HOUR
    for c in runs:
        c.tick()
    kept, bounded = runs
    assert vm(1) not in bounded.histories
    assert len(bounded.evicted) == 1
    # A late ownership move, then bytes of its MAC alone from when it still ran: both read it.
    clock.now += HOUR
    late = [
        event("VM.CREATE", vm(1), ACCT_B, T0 + 45 * MIN),
        event("VM.DESTROY", vm(1), ACCT_B, T0 + 48 * MIN),
    ]
    stream = Stream("s1")
    batch = stream.batch(
        [M(T0 + 20 * MIN, T0 + 21 * MIN, 700, instance="", domain="", mac=mac(1), address="")]
    )
    for c in runs:
        c.apply_events(late)
        c.apply_batches([Record(batch)])
    assert vm(1) in bounded.histories
    assert len(bounded.evicted) == 0
    assert bounded.histories[vm(1)] == kept.histories[vm(1)]
    for c in runs:
        c.tick()
    assert vm(1) not in bounded.histories  # closed still: it leaves again
    assert _everything(bounded.store) == _everything(kept.store)
    assert any(
        k.account == ACCT_A and q == 700 for k, q in kept.store.net_usage().items() if k.usage_type == 4
    )


def _everything(store: Store) -> dict[str, Any]:
    """All a billing system or an operator can read back."""
    return {
        "usage": [(r.key, r.quantity, r.recorded, r.adjustment, r.final) for r in store.usage(0, 2**62)],
        "adjustments": [(a.key, a.delta, a.reason, a.created_ms) for a in store.adjustments(0)],
        "parked": sorted(repr(m) for m in store.parked_rows()),
        "unbilled": store.unbilled(),
    }


# -- the property: any history, with and without eviction, the same records ---------------------
VMS = (1, 2, 3)
IP = "41aa0000-0000-4000-8000-00000000ip42"
IP_ADDRESS = "203.0.113.42"

_vm_event = st.tuples(
    st.just("vm"),
    st.sampled_from(VMS),
    st.sampled_from(["VM.CREATE", "VM.START", "VM.STOP", "VM.DESTROY"]),
    st.sampled_from([ACCT_A, ACCT_B]),
    st.integers(0, 6 * 24),  # hour of its stamp from T0: late ones land in evicted pasts
)
_ip_event = st.tuples(
    st.just("ip"), st.just(0), st.sampled_from(["NET.IPASSIGN", "NET.IPRELEASE"]),
    st.sampled_from([ACCT_A, ACCT_B]), st.integers(0, 6 * 24),
)  # fmt: skip
_measure = st.tuples(
    st.just("measure"),
    st.sampled_from(VMS),
    st.sampled_from(["uuid", "mac", "address"]),  # what it carries to be attributed by
    st.just(""),
    st.integers(0, 6 * 24 * 60 - 1),  # minute of its start
)
_advance = st.tuples(st.just("advance"), st.just(0), st.just(""), st.just(""), st.integers(1, 40))
steps = st.lists(st.one_of(_vm_event, _ip_event, _measure, _advance), min_size=1, max_size=30)


def _replay(collectors: list[Collector], clock: Clock, plan: list[tuple[Any, ...]]) -> None:
    stream = Stream("prop")
    for kind, i, what, account, at in plan:
        if kind == "advance":
            clock.now += at * HOUR
            for c in collectors:
                c.tick()
            continue
        if kind == "measure":
            fields = {"uuid": {"mac": "", "address": ""}, "mac": {"instance": "", "address": ""},
                      "address": {"instance": "", "domain": "", "mac": ""}}[what]  # fmt: skip
            start = T0 + at * MIN
            m = M(
                start,
                start + MIN,
                1000 + at,
                instance=vm(i),
                domain=f"i-2-{i}-VM",
                mac=mac(i),
                address=address(i),
            )
            batch = stream.batch([replace(m, **fields)])
            for c in collectors:
                c.apply_batches([Record(batch)])
            continue
        stamp = T0 + at * HOUR
        if kind == "ip":
            rec = event(what, IP, account, stamp, ipaddress=IP_ADDRESS)
        else:
            extra = {"macaddress": mac(i), "ipaddress": address(i)} if what == "VM.CREATE" else {}
            rec = event(what, vm(i), account, stamp, **extra)
        for c in collectors:
            c.apply_events([rec])
    clock.now += 3 * 24 * HOUR
    for c in collectors:
        c.tick()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=steps)
def test_eviction_changes_no_record(new_store: Callable[[], Store], plan: list[tuple[Any, ...]]) -> None:
    clock = Clock(T0 + 7 * 24 * HOUR)  # every stamp is in the past: late events and measures
    runs = [Collector(new_store(), s, clock) for s in (KEEPING, EVICTING)]
    _replay(runs, clock, plan)
    kept, bounded = runs
    assert _everything(bounded.store) == _everything(kept.store)
    bounded.restore(list(kept.histories))
    assert bounded.histories == kept.histories


def test_replicas_on_one_store_bring_back_what_another_replica_changed(
    new_store: Callable[[], Store],
) -> None:
    clock = Clock(T0 + 10 * HOUR)
    store = new_store()
    a, b = Collector(store, EVICTING, clock), Collector(store, KEEPING, clock)
    a.apply_events(vm_life(1, T0))
    a.tick()
    b.sync()
    assert vm(1) not in a.histories
    # Replica b stores a late event; a learns it by its sync and rebuilds from all events.
    b.apply_events(
        [event("VM.START", vm(1), ACCT_B, T0 + 2 * HOUR), event("VM.STOP", vm(1), ACCT_B, T0 + 3 * HOUR)]
    )
    a.sync()
    assert vm(1) in a.histories
    assert len(a.events[vm(1)]) == 6
    assert a.histories[vm(1)] == b.histories[vm(1)]
    assert a.histories[vm(1)].running[-1].start_ms == T0 + 2 * HOUR  # a late restart
    # A late measure of its uuid (of the late restart), arriving at a when it has left again,
    # goes to its owner then, as at b.
    clock.now += HOUR
    a.tick()
    assert vm(1) not in a.histories
    at = T0 + 2 * HOUR + 30 * MIN
    batch = Stream("s2").batch([M(at, at + MIN, 900, instance=vm(1), mac="", address="")])
    a.apply_batches([Record(batch)])
    owners = {k.account for k, q in store.net_usage().items() if k.usage_type == 4 and q == 900}
    assert owners == {b.histories[vm(1)].owner_at(at)} == {ACCT_B}
    assert store.parked_rows() == []


# -- what the agents' inventories taught: owner hints and witness ---------------------------------
def domain(i: int) -> str:
    return f"d0a10000-0000-4000-8000-{i:012d}"


def inventory_batch(
    stream: Stream, i: int, poll: int, *, state: int = pb.RUNNING, hinted: bool = True
) -> bytes:
    """One measure of domain i (no lifecycle knows it: only a hint names its owner), with its
    inventory (owner hint and state) unless `hinted` is False."""
    stream.seq += 1
    b = pb.MeasureBatch(
        schema=1, host_id=stream.host_id, boot_id="boot", stream_id=stream.stream_id, seq=stream.seq,
        poll_time=poll,
    )  # fmt: skip
    b.measures.append(
        M(poll - MIN, poll, 100 + i, instance=domain(i), domain=f"i-9-{i}-VM", mac="", address="").to_pb()
    )
    if hinted:
        dom = b.inventory.add(uuid=domain(i), name=f"i-9-{i}-VM", state=state)
        dom.owner.update({"ownerAccountUuid": ACCT_B if i % 2 else ACCT_A})
    return b.SerializeToString()


def test_hints_and_witness_of_domains_not_met_lately_leave_memory_and_come_back(
    new_store: Callable[[], Store],
) -> None:
    clock = Clock(T0)
    runs = [Collector(new_store(), s, clock) for s in (KEEPING, EVICTING)]
    streams = [Stream("inv-a"), Stream("inv-b")]
    domains = 40
    for i in range(domains):  # domain i reports at hour i (0 at half past too), and never again
        clock.now = T0 + i * HOUR
        for c, stream in zip(runs, streams, strict=True):
            c.apply_batches([Record(inventory_batch(stream, i, clock.now))])
            if i == 0:
                c.apply_batches([Record(inventory_batch(stream, i, clock.now + 30 * MIN))])
            c.tick()
    kept, bounded = runs
    assert (len(kept.hints), len(kept.witness)) == (2 * domains, domains)
    # Untouched for one to two ages (2 h) leave: at most the last 4 hours' domains stay.
    assert len(bounded.witness) <= 4
    assert len(bounded.hints) <= 2 * 4
    with bounded.store.read() as conn:
        left = reconciliation.load_witness(conn, [domain(0)])[domain(0)]
    assert left == Witness(True, T0, T0 + 30 * MIN)  # its last poll kept as it left
    # Domain 0 again: a measure without inventory is billed by its stored hint; an older poll than
    # the last one seen says shut off and changes nothing; then a newer one does.
    clock.now += HOUR
    for c, stream in zip(runs, streams, strict=True):
        c.apply_batches([Record(inventory_batch(stream, 0, clock.now, hinted=False))])
        c.apply_batches([Record(inventory_batch(stream, 0, T0 + 15 * MIN, state=pb.SHUTOFF))])
        assert c.witness[domain(0)] == Witness(True, T0, T0 + 30 * MIN)
        c.apply_batches([Record(inventory_batch(stream, 0, clock.now, state=pb.SHUTOFF))])
        assert c.witness[domain(0)] == Witness(False, clock.now, clock.now)
    assert _everything(bounded.store) == _everything(kept.store)
    assert any(k.account == ACCT_A and k.resource == domain(0) for k in bounded.store.net_usage())
    for c in runs:
        with c.store.read() as conn:
            assert {d: (w.running, w.since_ms) for d, w in reconciliation.load_witness(conn).items()} == {
                d: (w.running, w.since_ms) for d, w in kept.witness.items()
            }


def test_retention_pruning_a_resource_out_of_memory_drops_what_found_it(
    new_store: Callable[[], Store],
) -> None:
    from kvmeter.collector.prune import Pruner
    from kvmeter.collector.retention import RetentionPolicy
    from kvmeter.collector.schema_residency import evicted_keys

    clock = Clock(T0 + HOUR)
    bounded = Collector(new_store(), EVICTING, clock)
    bounded.apply_events(
        [*vm_life(1, T0), event("VM.CREATE", vm(2), ACCT_A, T0 + 30 * MIN, macaddress=mac(2))]
    )
    clock.now = T0 + 10 * HOUR
    bounded.tick()
    assert vm(1) not in bounded.histories

    def holders() -> set[str]:
        with bounded.store.read() as conn:
            return {r[0] for r in conn.execute(sa.select(evicted_keys.c.resource))}

    assert holders() == {vm(1)}
    Pruner(bounded.store, RetentionPolicy(lifecycle_events_ms=HOUR), clock).run()
    assert holders() == set()
    # Bytes of its MAC from when it ran: nothing to bring back, parked like any bytes nobody explains.
    batch = Stream("s9").batch(
        [M(T0 + 20 * MIN, T0 + 21 * MIN, 70, instance="", domain="", mac=mac(1), address="")]
    )
    out = bounded.apply_batches([Record(batch)])
    assert (out.parked, vm(1) in bounded.histories) == (1, False)
