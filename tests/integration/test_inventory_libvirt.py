"""Inventory against libvirt's own test driver: a CloudStack host from a node file, and live
domain events on the shared ``test:///default`` driver (another connection starts, changes and
stops domains; the inventory, read-only, follows by events alone)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest

from kvmeter.agent.inventory import Inventory
from kvmeter.agent.model import NicInfo
from tests.harness.libvirt_node import CLOUDSTACK_HOST, Domain, Nic, domain_xml, write_node_xml

pytestmark = pytest.mark.libvirt

EVENT_VM = Domain(
    name="i-3-30-VM",
    uuid="6f1c6c4e-0000-4000-8000-000000000030",
    nics=(
        Nic(mac="02:00:1e:00:00:01", bridge="brvx-5001", dev="kvtap30"),
        Nic(mac="02:00:1e:00:00:02", bridge="cloudbr0", dev="kvtap31"),
    ),
)


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def test_cloudstack_host_from_the_test_driver(libvirt_uri: str) -> None:
    inventory = Inventory(libvirt_uri)
    inventory.refresh()
    domains = {d.name: d for d in inventory.snapshot().values()}
    assert set(domains) == {d.name for d in CLOUDSTACK_HOST}
    for expected in CLOUDSTACK_HOST:
        got = domains[expected.name]
        assert got.uuid == expected.uuid
        assert got.state == ("running" if expected.running else "shutoff")
        assert [(n.mac, n.bridge, n.device, n.nic_type) for n in got.nics] == [
            (n.mac, n.bridge, n.dev, n.nic_type) for n in expected.nics
        ]
        assert got.owner == expected.owner  # CloudStack <metadata>, read generically
    user_vm, router, ssvm = domains["i-2-10-VM"], domains["r-5-VM"], domains["s-1-VM"]
    assert (user_vm.kind, user_vm.account_id, user_vm.vm_id) == ("user_vm", "2", "10")
    assert (router.kind, router.vm_id) == ("virtual_router", "5")
    assert ssvm.kind == "system_vm"
    assert inventory.by_device()["kvtap51"][0].name == "r-5-VM"
    assert inventory.by_device()["kvtap51"][1].bridge == "cloud0"


def test_every_nic_type_through_libvirt(tmp_path: Path) -> None:
    domain = Domain(
        name="v-4-VM",
        uuid="6f1c6c4e-0000-4000-8000-000000000040",
        nics=(
            Nic(mac="02:00:28:00:00:01", nic_type="network", network="default", dev="kvtap40"),
            Nic(mac="02:00:28:00:00:02", nic_type="direct", bridge="eth1.100", dev="kvtap41"),
            Nic(mac="02:00:28:00:00:03", nic_type="vhostuser", dev="vhu40"),
            Nic(mac="02:00:28:00:00:04", bridge="cloudbr0"),
        ),
    )
    inventory = Inventory(write_node_xml(tmp_path / "node.xml", [domain]))
    inventory.refresh()
    (got,) = inventory.snapshot().values()
    assert got.kind == "system_vm"
    nics = got.nics
    assert nics[0] == NicInfo("02:00:28:00:00:01", "kvtap40", "network", network="default", model="virtio")
    assert nics[1] == NicInfo("02:00:28:00:00:02", "kvtap41", "direct", model="virtio", source_dev="eth1.100")
    assert nics[2] == NicInfo("02:00:28:00:00:03", "vhu40", "vhostuser", model="virtio")
    # libvirt named the tap itself (the test driver says testnetN, a host says vnetN)
    assert nics[3].device is not None
    assert nics[3].bridge == "cloudbr0"


def test_interface_stats_from_the_test_driver(libvirt_uri: str) -> None:
    inventory = Inventory(libvirt_uri, resync_seconds=3600)
    inventory.start()
    try:
        router = next(d for d in inventory.snapshot().values() if d.name == "r-5-VM")
        stats = inventory.interface_stats(router.uuid, "kvtap50")
        assert stats is not None
        assert len(stats) == 4
        assert all(isinstance(v, int) and v >= 0 for v in stats)
        assert inventory.interface_stats(router.uuid, "no-such-nic") is None
        assert inventory.interface_stats("6f1c6c4e-0000-4000-8000-0000000000ff", "kvtap50") is None
    finally:
        inventory.stop()


@pytest.fixture
def default_driver() -> Iterator[libvirt.virConnect]:
    """A read-write connection to the process-wide test:///default driver (cleaned up after)."""
    conn = libvirt.open("test:///default")
    try:
        yield conn
    finally:
        for dom in conn.listAllDomains(0):
            if dom.name() == EVENT_VM.name and dom.isActive():
                dom.destroy()
        conn.close()


def test_domain_events_keep_the_inventory_current(default_driver: libvirt.virConnect) -> None:
    inventory = Inventory("test:///default", resync_seconds=3600)  # no resync during the test
    inventory.start()
    try:
        assert EVENT_VM.uuid not in inventory.snapshot()
        dom = default_driver.createXML(domain_xml(EVENT_VM), 0)  # transient, like CloudStack's
        wait_for(lambda: EVENT_VM.uuid in inventory.snapshot())
        got = inventory.snapshot()[EVENT_VM.uuid]
        assert (got.name, got.kind, got.account_id, got.vm_id, got.state) == (
            "i-3-30-VM",
            "user_vm",
            "3",
            "30",
            "running",
        )
        assert set(inventory.by_device()) >= {"kvtap30", "kvtap31"}

        dom.suspend()
        wait_for(lambda: inventory.snapshot()[EVENT_VM.uuid].state == "paused")
        dom.resume()
        wait_for(lambda: inventory.snapshot()[EVENT_VM.uuid].state == "running")

        # newer CloudStack writes owner metadata; libvirt reports the change as an event
        dom.setMetadata(
            libvirt.VIR_DOMAIN_METADATA_ELEMENT,
            "<instance><ownerAccountUuid>acct-3</ownerAccountUuid></instance>",
            "cloudstack",
            "http://cloudstack.apache.org/metadata/1.0",
            libvirt.VIR_DOMAIN_AFFECT_LIVE,
        )
        wait_for(lambda: inventory.snapshot()[EVENT_VM.uuid].owner.get("ownerAccountUuid") == "acct-3")

        dom.destroy()  # a transient domain disappears when it stops
        wait_for(lambda: EVENT_VM.uuid not in inventory.snapshot())
        assert "kvtap30" not in inventory.by_device()
        assert inventory.resyncs == 1  # all of the above came from events
        assert inventory.reconnects == 0
    finally:
        inventory.stop()
