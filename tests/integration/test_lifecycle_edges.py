"""Time-based usage from CloudStack's lifecycle at its edges, through the real Collector and the
store: an owner change while a segment stays open (an assignment under allocated_until =
"expunge", an IP assigned anew after its release was lost) bills each owner its own time; a
replica's tick learns, under the resources' lock, the events another replica stored since its
sync; consecutive scalings delivered in order each keep their offering, whatever the type of
their job (scaleVirtualMachine's is VM.UPGRADE, its usage event on a running VM VM.DYNAMIC.SCALE,
published twice by some releases); a virtual router's state events bill no VM time to its
network's owner."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmeter.collector.model import ALLOCATED_VM, IP_ADDRESS, RUNNING_VM, Record, Settings
from kvmeter.collector.policy import BillingPolicy
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store
from tests.collector_support import (
    ACCT_A,
    ACCT_B,
    HOUR,
    IP1,
    T0,
    VM1,
    Clock,
    cs_time,
    usage_event,
)
from tests.retention_support import state_event

MIN = 60_000


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path}/u.db")
    s.migrate()
    yield s
    s.close()


def rec(kv: tuple[bytes, bytes], origin: str = "", order: tuple[str, int] | None = None) -> Record:
    key, value = kv
    return Record(value, key, origin, order)


def by_account(store: Store, usage_type: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, qty in store.net_usage().items():
        if key.usage_type == usage_type:
            out[key.account] = out.get(key.account, 0) + qty
    return out


def test_an_assignment_under_the_expunge_policy_bills_each_owner_its_allocation(store: Store) -> None:
    """assignVirtualMachine (reference §2 / tests/unit/test_lifecycle.py::test_ownership_move_in_one_second):
    VM.DESTROY for the old owner and VM.CREATE for the new one, same second. Under
    allocated_until = "expunge" the DESTROY leaves ALLOCATED open and the CREATE opens nothing:
    the open segment is cut where the owner changed."""
    settings = Settings(policy=BillingPolicy(allocated_until="expunge"))
    clock = Clock(T0 + 4 * HOUR)
    c = Collector(store, settings, clock)
    c.apply_events(
        [
            rec(usage_event("VM.CREATE", VM1, ACCT_A, T0)),
            rec(usage_event("VM.DESTROY", VM1, ACCT_A, T0 + 2 * HOUR)),
            rec(usage_event("VM.CREATE", VM1, ACCT_B, T0 + 2 * HOUR)),
        ]
    )
    c.tick()
    assert by_account(store, ALLOCATED_VM) == {ACCT_A: 2 * HOUR, ACCT_B: 2 * HOUR}


def test_a_replicas_tick_learns_a_stop_another_replica_stored_after_its_sync(
    tmp_path: Path,
) -> None:
    """Two replicas on one store (README: 1..N replicas). Replica 2's tick syncs, then replica 1
    commits the VM's STOP (the timing is all the hook below adds), then replica 2 writes the
    open windows: from the history as stored under the lock, not as synced (RUNNING up to now
    would never be rewritten: the VM has no open segment any more)."""
    url = f"sqlite:///{tmp_path}/u.db"
    s1, s2 = Store(url), Store(url)
    s1.migrate()
    clock = Clock(T0 + 10 * MIN)
    r1, r2 = Collector(s1, Settings(), clock), Collector(s2, Settings(), clock)
    r1.apply_events([rec(usage_event("VM.START", VM1, ACCT_A, T0))])
    clock.now = T0 + 56 * MIN
    r2.tick()  # replica 2 learns the VM running
    r2_sync = r2.sync

    def sync_then_stop() -> set[str]:
        changed = r2_sync()
        r1.apply_events([rec(usage_event("VM.STOP", VM1, ACCT_A, T0 + 57 * MIN))])  # replica 1, meanwhile
        return changed

    clock.now = T0 + 59 * MIN
    r2.sync = sync_then_stop  # type: ignore[method-assign]
    r2.tick()
    r2.sync = r2_sync  # type: ignore[method-assign]
    clock.now = T0 + 4 * HOUR
    r1.tick()
    r2.tick()
    assert by_account(s1, RUNNING_VM) == {ACCT_A: 57 * MIN}  # 00:00-00:57, not up to 00:59
    s1.close()
    s2.close()


def _job(kind: str, offering: str, n: int) -> tuple[bytes, bytes]:
    vm = {"id": VM1, "serviceofferingid": offering, "cpunumber": 1, "memory": 1024}
    doc = {
        "account": ACCT_A,
        "instanceUuid": VM1,
        "instanceType": "VirtualMachine",
        "commandEventType": kind,
        "jobId": f"job-{n}",
        "jobResult": {"virtualmachine": vm},
        "status": "SUCCEEDED",
    }
    return VM1.encode(), json.dumps(doc).encode()


def _running_by_offering(store: Store) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, qty in store.net_usage().items():
        if key.usage_type == RUNNING_VM:
            out[key.offering] = out.get(key.offering, 0) + qty
    return out


def test_a_second_scaling_keeps_the_first_ones_offering(store: Store) -> None:
    """The first VM.DYNAMIC.SCALE (bare usage event + its completed job naming "medium") splits
    RUNNING at 01:00 and the windows after it are billed (and made final) at "medium". A second
    scaling a few hours later: with every event delivered by one partition, each job pairs with
    the bare scaling event just before it, so the final medium windows are not adjusted back."""
    clock = Clock(T0 + 5 * HOUR)
    c = Collector(store, Settings(), clock)
    kafka = "cloudstack/0"  # one partition: Kafka keys by resource uuid (reference §1.2)
    c.apply_events(
        [
            rec(_job("VM.CREATE", "small", 1), order=(kafka, 1)),
            rec(usage_event("VM.CREATE", VM1, ACCT_A, T0), order=(kafka, 0)),
            rec(usage_event("VM.START", VM1, ACCT_A, T0), order=(kafka, 2)),
            rec(usage_event("VM.DYNAMIC.SCALE", VM1, ACCT_A, T0 + HOUR), order=(kafka, 3)),
            rec(_job("VM.DYNAMIC.SCALE", "medium", 2), order=(kafka, 4)),
        ]
    )
    c.tick()  # windows up to 03:00 final
    assert _running_by_offering(store) == {"small": HOUR, "medium": 4 * HOUR}
    clock.now = T0 + 6 * HOUR
    c.apply_events(
        [
            rec(usage_event("VM.DYNAMIC.SCALE", VM1, ACCT_A, T0 + 6 * HOUR), order=(kafka, 5)),
            rec(_job("VM.DYNAMIC.SCALE", "large", 3), order=(kafka, 6)),
        ]
    )
    c.tick()
    # 00:00-01:00 small, 01:00-06:00 medium (already billed, final up to 04:00), then large
    assert _running_by_offering(store) == {"small": HOUR, "medium": 5 * HOUR}


def test_two_scalings_pair_with_their_vm_upgrade_jobs(store: Store) -> None:
    """Two scaleVirtualMachine calls on a running VM, all delivered by one partition: each bare
    VM.DYNAMIC.SCALE usage event takes the offering of the completed job (commandEventType
    VM.UPGRADE) delivered just after it, so RUNNING is small 0-1h, medium 1-3h, large 3-5h."""
    c = Collector(store, Settings(), Clock(T0 + 5 * HOUR))
    kafka = "cloudstack/0"  # one partition: the bus keys usage and job events by the VM's uuid
    c.apply_events(
        [
            rec(usage_event("VM.CREATE", VM1, ACCT_A, T0), order=(kafka, 0)),
            rec(_job("VM.CREATE", "small", 1), order=(kafka, 1)),
            rec(usage_event("VM.START", VM1, ACCT_A, T0), order=(kafka, 2)),
            rec(usage_event("VM.DYNAMIC.SCALE", VM1, ACCT_A, T0 + HOUR), order=(kafka, 3)),
            rec(_job("VM.UPGRADE", "medium", 2), order=(kafka, 4)),
            rec(usage_event("VM.DYNAMIC.SCALE", VM1, ACCT_A, T0 + 3 * HOUR), order=(kafka, 5)),
            rec(_job("VM.UPGRADE", "large", 3), order=(kafka, 6)),
        ]
    )
    c.tick()
    assert _running_by_offering(store) == {"small": HOUR, "medium": 2 * HOUR, "large": 2 * HOUR}


def test_one_scaling_published_twice_takes_its_jobs_offering(store: Store) -> None:
    """One scaleVirtualMachine of a running VM: CloudStack publishes VM.DYNAMIC.SCALE twice
    (orchestrateReConfigureVm and upgradeVirtualMachine(ScaleVMCmd)), then its VM.UPGRADE job
    completes naming "medium": RUNNING is split at the scaling, medium from then on."""
    c = Collector(store, Settings(), Clock(T0 + 5 * HOUR))
    kafka = "cloudstack/0"  # one partition: the bus keys usage and job events by the VM's uuid
    c.apply_events(
        [
            rec(usage_event("VM.CREATE", VM1, ACCT_A, T0), order=(kafka, 0)),
            rec(_job("VM.CREATE", "small", 1), order=(kafka, 1)),
            rec(usage_event("VM.START", VM1, ACCT_A, T0), order=(kafka, 2)),
            rec(usage_event("VM.DYNAMIC.SCALE", VM1, ACCT_A, T0 + HOUR), order=(kafka, 3)),
            rec(usage_event("VM.DYNAMIC.SCALE", VM1, ACCT_A, T0 + HOUR + 1000), order=(kafka, 4)),
            rec(_job("VM.UPGRADE", "medium", 2), order=(kafka, 5)),
        ]
    )
    c.tick()
    assert _running_by_offering(store) == {"small": HOUR, "medium": 4 * HOUR}


def test_an_ip_assigned_anew_after_a_lost_release_is_billed_to_its_new_owner(store: Store) -> None:
    """Lossy bus: the NET.IPRELEASE of A's address is lost; the same IP is then assigned to B
    (NET.IPASSIGN with B as owner: a usage event's account is the owner). The assign opens
    nothing (the segment is still open): the segment is cut at it, B billed from then on."""
    clock = Clock(T0 + 5 * HOUR)
    c = Collector(store, Settings(), clock)
    c.apply_events(
        [
            rec(usage_event("NET.IPASSIGN", IP1, ACCT_A, T0)),
            # NET.IPRELEASE at T0 + 1h lost
            rec(usage_event("NET.IPASSIGN", IP1, ACCT_B, T0 + 2 * HOUR)),
        ]
    )
    c.tick()
    assert by_account(store, IP_ADDRESS).get(ACCT_B) == 3 * HOUR


ROUTER_UUID = "9b1f0000-0000-4000-8000-000000router"


def test_a_virtual_routers_state_events_bill_no_vm_time_to_its_network_owner(store: Store) -> None:
    """CloudStack publishes resource-state events for every VM type (UserVmStateListener:
    published before its `Type.User` check), so a router's start reaches the bus like a user
    VM's. The reconciler gives the router its network owner (ROUTER.OWNER, for its bytes); no
    RUNNING_VM comes of it: CloudStack's usage server bills VM time for user VMs only."""
    router_owner = json.dumps(
        {
            "account": ACCT_A,
            "event": "ROUTER.OWNER",
            "eventDateTime": cs_time(T0),
            "id": ROUTER_UUID,
            "reason": "owner of its guest network",
            "resource": "DomainRouter",
            "source": "cloudstack-api",
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    clock = Clock(T0 + 3 * HOUR)
    c = Collector(store, Settings(), clock)
    c.apply_events(
        [
            rec(state_event(ROUTER_UUID, "Starting", "Running", T0)),
            Record(router_owner, ROUTER_UUID.encode()),
        ]
    )
    c.tick()
    assert by_account(store, RUNNING_VM) == {}


def test_assign_vm_skewed_by_two_seconds_bills_each_owner_its_own_allocation(store: Store) -> None:
    """assignVirtualMachine whose VM.CREATE (management server 2) is stamped 2 s before the
    VM.DESTROY delivered ahead of it: each owner keeps exactly its own allocation (an owner
    change is never timed before its event's order time)."""
    clock = Clock(T0 + 4 * HOUR)
    c = Collector(store, Settings(), clock)
    kafka = "cloudstack/0"
    c.apply_events(
        [
            rec(usage_event("VM.CREATE", VM1, ACCT_A, T0), order=(kafka, 0)),
            rec(usage_event("VM.DESTROY", VM1, ACCT_A, T0 + 2 * HOUR), order=(kafka, 1)),
            rec(usage_event("VM.CREATE", VM1, ACCT_B, T0 + 2 * HOUR - 2000), order=(kafka, 2)),
        ]
    )
    c.tick()
    assert by_account(store, ALLOCATED_VM) == {ACCT_A: 2 * HOUR, ACCT_B: 2 * HOUR}
