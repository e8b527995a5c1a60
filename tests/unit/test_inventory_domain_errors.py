"""The inventory's worker when libvirt fails for one domain while its connection stays alive (a
timeout on that domain): the other domains' refreshes drained with it still happen, and a resync
(the first sync too) reads every other domain and keeps what was known of the failing one."""

from __future__ import annotations

import threading
import time

import libvirt
import pytest

from kvmeter.agent.inventory import Inventory
from tests.unit.fakes.libvirt_conn import FakeConnection, FakeLibvirtError, FakeOpener


def _domain_xml(name: str, uuid: str, tap: str) -> str:
    return (
        f"<domain type='kvm'><name>{name}</name><uuid>{uuid}</uuid><devices>"
        f"<interface type='bridge'><mac address='02:00:00:00:{tap[-2:]}:01'/><source bridge='cloudbr0'/>"
        f"<target dev='{tap}'/></interface></devices></domain>"
    )


def test_one_failing_domain_refresh_does_not_drop_the_others_queued_with_it() -> None:
    conn = FakeConnection()
    holder = conn.add(_domain_xml("i-2-1-VM", "00000000-0000-4000-8000-000000000001", "vnet01"))
    failing = conn.add(_domain_xml("i-2-2-VM", "11111111-0000-4000-8000-000000000002", "vnet02"))
    inventory = Inventory("fake:///", opener=FakeOpener(lambda: conn), resync_seconds=3600)
    inventory.start(wait=5)
    try:
        assert set(inventory.snapshot()) == {holder.uuid, failing.uuid}
        lifecycle = libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE
        # hold the worker in one refresh so that the next events are drained together
        holder.block = threading.Event()
        conn.fire(lifecycle, holder, 0, 0)
        time.sleep(0.2)

        # a libvirt call on one domain fails, the connection stays alive (e.g. a timeout)
        def fail(flags: int = 0) -> str:
            raise FakeLibvirtError("Timed out during operation: cannot acquire state change lock",
                                   libvirt.VIR_ERR_OPERATION_TIMEOUT)  # fmt: skip

        failing.XMLDesc = fail
        new = conn.add(_domain_xml("i-2-3-VM", "22222222-0000-4000-8000-000000000003", "vnet03"))
        conn.fire(lifecycle, failing, 0, 0)
        conn.fire(lifecycle, new, 0, 0)  # a VM started: its NIC must be known
        holder.block.set()
        deadline = time.monotonic() + 3
        while new.uuid not in inventory.snapshot() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert new.uuid in inventory.snapshot()  # not dropped until the next resync
    finally:
        inventory.stop(timeout=1.0)


def test_one_domain_failing_during_a_resync_does_not_hide_every_other_domain() -> None:
    conn = FakeConnection()
    healthy = conn.add(_domain_xml("i-2-1-VM", "00000000-0000-4000-8000-000000000001", "vnet01"))
    failing = conn.add(_domain_xml("i-2-2-VM", "11111111-0000-4000-8000-000000000002", "vnet02"))

    def fail(flags: int = 0) -> str:
        raise FakeLibvirtError("Timed out during operation: cannot acquire state change lock",
                               libvirt.VIR_ERR_OPERATION_TIMEOUT)  # fmt: skip

    failing.XMLDesc = fail
    inventory = Inventory("fake:///", opener=FakeOpener(lambda: conn))
    try:
        inventory.refresh()  # the worker's resync (first sync, then every resync_seconds) is this
    except libvirt.libvirtError as exc:
        pytest.fail(f"one domain's failure aborted the whole resync: {exc}")
    assert healthy.uuid in inventory.snapshot()
