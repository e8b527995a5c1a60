"""The agent's inventory against a real libvirtd with QEMU guests: what libvirt's events tell it.

The inventory resyncs only once (at connect, resync_seconds is an hour), so every later change
it shows came from a libvirt event: define, start, `virsh destroy`, a guest's own poweroff, and
a libvirtd restart while guests run (it reconnects and loses nothing).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvmeter.agent.inventory import Inventory
from kvmeter.agent.model import DomainInfo
from tests.harness.realvm import GUEST_PEER, Guest, GuestNic, RealHost, wait_until

pytestmark = [pytest.mark.realvm, pytest.mark.netns]

ALICE = {"ownerAccountUuid": "5a1ce000-0000-4000-8000-00000000a11c", "ownerAccountName": "alice"}
USER_VM = Guest(
    "i-2-910-VM",
    "ee000000-0000-4000-8000-000000000910",
    (GuestNic("brvx-5001", "02:00:0e:00:09:10", "10.1.1.91/24", GUEST_PEER),),
    owner={**ALICE, "instanceUuid": "ee000000-0000-4000-8000-000000000910"},
)
ROUTER = Guest(
    "r-911-VM",
    "ee000000-0000-4000-8000-000000000911",
    (
        GuestNic("brvx-5001", "02:00:0e:00:09:11", "10.1.1.92/24", GUEST_PEER),  # eth0 guest
        GuestNic("cloud0", "0e:00:a9:fe:09:11", "169.254.9.11/16", "169.254.0.1"),  # eth1 control
        GuestNic("cloudbr0", "06:00:0e:00:09:11", "198.51.100.91/24", "198.51.100.1"),  # eth2 public
    ),
    owner=ALICE,
)


@pytest.fixture
def inventory(guests: RealHost) -> Iterator[Inventory]:
    inv = Inventory(guests.libvirtd.readonly_uri, resync_seconds=3600, backoff_initial=0.1, backoff_max=0.5)
    inv.start()
    assert inv.connected
    try:
        yield inv
    finally:
        inv.stop()


def domain(inv: Inventory, uuid: str) -> DomainInfo | None:
    return inv.snapshot().get(uuid)


def wait_domain(inv: Inventory, uuid: str, state: str, what: str) -> DomainInfo:
    wait_until(lambda: (d := domain(inv, uuid)) is not None and d.state == state, 30, what)
    found = domain(inv, uuid)
    assert found is not None
    return found


def test_events_define_start_destroy_poweroff_and_restart(inventory: Inventory, guests: RealHost) -> None:
    resyncs = inventory.resyncs
    for guest in (USER_VM, ROUTER):
        guests.define(guest)
    vm = wait_domain(inventory, USER_VM.uuid, "shutoff", "define seen")
    assert (vm.name, vm.kind, vm.account_id, vm.vm_id) == ("i-2-910-VM", "user_vm", "2", "910")
    assert vm.owner["ownerAccountName"] == "alice"

    taps = {g.name: guests.start(g.name) for g in (USER_VM, ROUTER)}
    for guest in (USER_VM, ROUTER):
        info = wait_domain(inventory, guest.uuid, "running", f"start of {guest.name} seen")
        nics = [(n.device, n.mac, n.bridge, n.nic_type) for n in info.nics]
        assert nics == [(t.ifname, t.mac, t.bridge, "bridge") for t in taps[guest.name]]
    router = domain(inventory, ROUTER.uuid)
    assert router is not None
    assert router.kind == "virtual_router"
    by_device = inventory.by_device()
    for guest in (USER_VM, ROUTER):
        for tap in taps[guest.name]:
            assert by_device[tap.ifname][0].uuid == guest.uuid
    for guest in (USER_VM, ROUTER):
        guests.wait_up(guest.name)

    # libvirtd restarts while both guests run: the inventory reconnects and keeps them
    guests.libvirtd.restart()
    wait_until(lambda: inventory.reconnects == 1 and inventory.connected, 30, "reconnect to libvirtd")
    assert guests.state(USER_VM.name) == "running"
    assert {d.uuid: d.state for d in inventory.snapshot().values()} == {
        USER_VM.uuid: "running",
        ROUTER.uuid: "running",
    }
    assert inventory.by_device() == by_device
    resyncs_after_reconnect = inventory.resyncs

    # events still arrive on the new connection: destroy, and the guest's own poweroff
    guests.destroy(USER_VM.name)
    vm = wait_domain(inventory, USER_VM.uuid, "shutoff", "destroy seen")
    assert all(n.device is None for n in vm.nics)
    assert not any(info.uuid == USER_VM.uuid for info, _ in inventory.by_device().values())

    guests.poweroff(ROUTER.name)
    wait_domain(inventory, ROUTER.uuid, "shutoff", "guest poweroff seen")
    assert guests.state(ROUTER.name) == "shut off"
    assert inventory.by_device() == {}
    assert guests.guest_lines(ROUTER.name, "final"), "the guest printed its last counters"

    # a full resync ran only on connecting: each change above came from an event
    assert resyncs_after_reconnect == resyncs + 1
    assert inventory.resyncs == resyncs_after_reconnect
