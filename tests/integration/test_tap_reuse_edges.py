"""A tap name (vnetN) reused by another VM between two polls, even under the deleted tap's
ifindex or before libvirt tells of the change: the first VM's tail stays its own and the second's
bytes are never billed to the first nor lost; and a VM assigned to another account (VM.ASSIGN)
never shows its new owner's name or tags on its previous owner's records."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmeter.agent.linktable import LinkRecord
from kvmeter.agent.metered import tap_mac
from kvmeter.agent.model import NicInfo
from kvmeter.collector.api_cloudstack import load_directory
from kvmeter.collector.cs_snapshot import Account, Domain, Snapshot, Vm
from kvmeter.collector.store import Store
from kvmeter.collector.store.reconciliation import save_names, save_snapshot
from kvmeter.proto import pb
from tests.api_support import NOW, filled_store, scoped_app
from tests.collector_support import ACCT_A, ACCT_B, VM1, ZONE
from tests.unit.test_agent_attribution_edges import Host, billed, make_agent, vm
from tests.unit.test_agent_daemon import Clock, FakeInventory

DOMAIN_A, DOMAIN_B = "d0000000-0000-4000-8000-00000000dom-a", "d0000000-0000-4000-8000-00000000dom-b"
DAY = {"command": "listUsageRecords", "startdate": "2024-05-14", "enddate": "2024-05-14", "response": "json"}


@pytest.fixture
def moved_store(tmp_path: Path) -> Iterator[Store]:
    """The shared scenario (VM1 ran for alice, ACCT_A); then VM1 was assigned to bob (ACCT_B),
    who renamed it and tagged it: its <metadata> and CloudStack's API now say so."""
    s, _ = filled_store(tmp_path)
    hints = {VM1: {"instanceUuid": VM1, "ownerAccountUuid": ACCT_B, "ownerAccountName": "bob",
                   "ownerDomainUuid": DOMAIN_B, "ownerDomainName": "customers", "zoneUuid": ZONE,
                   "tag[0].key": "customer", "tag[0].value": "bob-secret"}}  # fmt: skip
    snapshot = Snapshot(
        NOW,
        vms={
            VM1: Vm(
                VM1,
                "bobs-payroll-db",
                "Running",
                "bob",
                DOMAIN_B,
                "",
                "",
                2,
                2048,
                NOW,
                ZONE,
                template="bobs-private-template",
            )
        },
        accounts={ACCT_A: Account(ACCT_A, "alice", DOMAIN_A), ACCT_B: Account(ACCT_B, "bob", DOMAIN_B)},
        domains={
            DOMAIN_A: Domain(DOMAIN_A, "ROOT", "ROOT"),
            DOMAIN_B: Domain(DOMAIN_B, "customers", "ROOT/customers"),
        },
    )
    with s.write() as conn:
        s.save_owner_hints(conn, hints, NOW)
        save_names(conn, snapshot, NOW)
        save_snapshot(conn, snapshot, NOW)
    yield s
    s.close()


def _records(store: Store, **params: str) -> list[dict[str, Any]]:
    resp = scoped_app(store).test_client().get("/client/api", query_string={**DAY, **params})
    assert resp.status_code == 200, resp.data
    (inner,) = json.loads(resp.data).values()
    return list(inner.get("usagerecord", []))


def test_old_owners_records_never_show_the_new_owners_name_or_tags(moved_store: Store) -> None:
    """After VM.ASSIGN (or a rename by the new owner), the previous owner's records of the VM
    must not carry what the VM's new owner set: its tags, its name (in `name` and
    `description`) or its template. A's invoice shows none of B's data; the new owner's own
    records do carry them."""
    old = _records(moved_store, accountid=ACCT_A, includetags="true")
    mine = [r for r in old if r["usageid"] == VM1]
    assert mine, "the scenario has alice's records of VM1"
    text = json.dumps(mine)
    assert "bob-secret" not in text
    assert "customer" not in text
    assert "bobs-payroll-db" not in text
    assert "bobs-private-template" not in text
    assert all(r["tags"] == [] for r in mine)
    assert all(r["accountid"] == ACCT_A for r in mine)
    with moved_store.read() as conn:  # the new owner's own records still carry them
        now = load_directory(moved_store, conn).instance(VM1, ACCT_B)
    assert (now.name, now.tags) == ("bobs-payroll-db", (("customer", "bob-secret"),))


NIC_A = NicInfo(mac="52:54:00:00:00:0a", device="vnet3", nic_type="bridge", bridge="cloudbr0")
NIC_B = NicInfo(mac="52:54:00:00:00:0b", device="vnet3", nic_type="bridge", bridge="cloudbr0")


def _no_sysfs(name: str) -> str | None:
    """A tap's MAC comes with its link message (IFLA_ADDRESS): no read of sysfs per new tap,
    which a VM storm would pay hundreds of times in one poll."""
    raise AssertionError(f"{name}'s MAC read from sysfs")


def _reused_tap(tmp_path: Path, *, new_ifindex: int, libvirt: str) -> dict[tuple[str, int], int]:
    """VM A on vnet3 (ifindex 10) stops, VM B starts on a new tap also named vnet3, both between
    two polls. libvirt: "on time" (the inventory says B before the poll), "late" (it still says
    A at that poll), "half" (B's start seen, A's stop not yet)."""
    a, b = vm("u-a", NIC_A), vm("u-b", NIC_B)
    host = Host(LinkRecord(10, "vnet3", "tun", address=tap_mac(NIC_A.mac)))
    inventory, clock = FakeInventory((a,)), Clock()
    macs = {10: tap_mac(NIC_A.mac), new_ifindex: tap_mac(NIC_B.mac)}
    # Two NICs naming vnet3 ("half") are matched by MAC, which reads sysfs; else nothing does
    read_mac = (lambda name: macs.get(host.table.ifindex(name) or 0)) if libvirt == "half" else _no_sysfs
    agent = make_agent(host, inventory, tmp_path, clock, read_mac=read_mac)
    agent.poll_once()  # the baseline
    host.traffic("vnet3", 100, 200)
    clock.t += 10
    agent.poll_once()
    host.traffic("vnet3", 30, 40)  # A's tail: RTM_DELLINK carries it
    host.delete("vnet3")
    host.add(LinkRecord(new_ifindex, "vnet3", "tun", address=tap_mac(NIC_B.mac)))
    host.traffic("vnet3", 1000, 2000)  # B's first bytes
    inventory.domains = {"on time": (b,), "late": (a,), "half": (a, b)}[libvirt]
    clock.t += 10
    agent.poll_once()
    inventory.domains = (b,)
    for i in range(2):
        host.traffic("vnet3", 1 + i, 2 + i)
        clock.t += 10
        agent.poll_once()
    agent.close()
    return {k: v for k, v in billed(tmp_path).items() if v}


# host rx is what the VM sent (VM_TX), host tx what it received (VM_RX)
EXPECTED = {
    ("u-a", pb.VM_TX): 130, ("u-a", pb.VM_RX): 240,
    ("u-b", pb.VM_TX): 1003, ("u-b", pb.VM_RX): 2005,
}  # fmt: skip


@pytest.mark.parametrize("libvirt", ["on time", "late"])
def test_a_tap_made_again_with_the_deleted_ones_ifindex_counts_for_its_new_vm(
    tmp_path: Path, libvirt: str
) -> None:
    """The kernel may give a new tap the ifindex of one just deleted (after the ifindex space
    wrapped, or an explicit index): the same (boot, ifindex, name) identity. A's final counters
    (RTM_DELLINK) are A's and every byte of the new tap is B's: the new incarnation is a new
    counter, never left closed (and its bytes lost) because the old one's final closed it."""
    assert _reused_tap(tmp_path, new_ifindex=10, libvirt=libvirt) == EXPECTED


@pytest.mark.parametrize("libvirt", ["late", "half"])
def test_a_reused_tap_name_made_before_libvirt_tells_is_not_billed_to_the_vm_that_left(
    tmp_path: Path, libvirt: str
) -> None:
    """libvirt's events for A's stop and B's start may come after the poll that first sees the
    new vnet3: its MAC is not A's NIC's, so it is not A's. B's first bytes go to B (counted
    from zero once libvirt says whose the tap is), never to A; A's tail stays A's."""
    assert _reused_tap(tmp_path, new_ifindex=11, libvirt=libvirt) == EXPECTED
