"""Inventory over a hand-written fake libvirt connection fed captured domain XML: what it
builds, how events and resyncs keep it current, reconnects, and hung libvirt calls."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import libvirt
import pytest

from kvmeter.agent.inventory import Inventory
from kvmeter.agent.libvirt_events import domain_state
from kvmeter.agent.model import NicInfo
from tests.unit.fakes.libvirt_conn import FakeConnection, FakeOpener, xml_of

USER_VM = "8e3c3b1a-5d0f-4c4b-9e5a-1b2c3d4e5f60"
ROUTER = "5b0e6d70-7a2e-4b8e-a6c1-000000000005"
SSVM = "1c1c1c1c-0000-4000-8000-000000000001"
LAB = "0f0e0d0c-0b0a-4909-8807-060504030201"
LIFECYCLE = libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE


def host() -> FakeConnection:
    conn = FakeConnection("i-2-10-VM", "r-5-VM", "mixed-nics")
    conn.add(xml_of("s-1-VM"), state=libvirt.VIR_DOMAIN_SHUTOFF)
    return conn


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


@pytest.fixture
def running() -> Iterator[Callable[..., tuple[Inventory, FakeOpener]]]:
    started: list[Inventory] = []

    def start(opener: FakeOpener, wait: float = 10.0, **kwargs: float) -> tuple[Inventory, FakeOpener]:
        inventory = Inventory("fake:///", opener=opener, backoff_initial=0.01, backoff_max=0.05, **kwargs)
        inventory.start(wait=wait)
        started.append(inventory)
        return inventory, opener

    yield start
    for inventory in started:
        inventory.stop(timeout=1.0)


def test_refresh_builds_domains_from_captured_xml() -> None:
    opener = FakeOpener(host)
    inventory = Inventory("qemu:///system", opener=opener)
    inventory.refresh()
    domains = inventory.snapshot()
    assert set(domains) == {USER_VM, ROUTER, SSVM, LAB}
    vm = domains[USER_VM]
    assert (vm.name, vm.kind, vm.account_id, vm.vm_id, vm.state) == (
        "i-2-10-VM",
        "user_vm",
        "2",
        "10",
        "running",
    )
    assert vm.owner["ownerAccountUuid"] == "a1a1a1a1-0000-4000-8000-000000000002"
    assert [n.device for n in vm.nics] == ["vnet0", "vnet1"]
    router = domains[ROUTER]
    assert (router.kind, router.vm_id, router.account_id, router.owner) == ("virtual_router", "5", None, {})
    assert [n.bridge for n in router.nics] == ["brvx-1001", "cloud0", "breth1-100"]
    assert (domains[SSVM].kind, domains[SSVM].state) == ("system_vm", "shutoff")
    assert domains[LAB].kind == "other"
    # refresh() without start() uses a connection of its own and closes it
    assert opener.calls == ["qemu:///system"]
    assert opener.connections[0].closed
    assert not inventory.connected


def test_by_device_maps_named_nics_to_their_domain() -> None:
    inventory = Inventory(opener=FakeOpener(host))
    inventory.refresh()
    by_device = inventory.by_device()
    domain, nic = by_device["vnet4"]
    assert domain.name == "r-5-VM"
    assert nic == NicInfo("1e:00:c8:00:00:44", "vnet4", "bridge", bridge="breth1-100", model="virtio")
    assert by_device["macvtap0"][1].nic_type == "direct"
    assert by_device["vhu0"][1].nic_type == "vhostuser"
    assert set(by_device) == {"vnet0", "vnet1", "vnet2", "vnet3", "vnet4", "vnet5", "vnet6", "vnet7"} | {
        "macvtap0",
        "vhu0",
        "tap-custom",
        "vnet8",
    }


def test_instance_suffix_is_configurable() -> None:
    inventory = Inventory(opener=FakeOpener(host), instance_suffix="CLOUD")
    inventory.refresh()
    assert {d.kind for d in inventory.snapshot().values()} == {"other"}


def test_unreadable_or_vanishing_domains_are_skipped_and_the_rest_kept() -> None:
    def make() -> FakeConnection:
        conn = host()
        conn.add("<domain><name>broken</name><uuid>ffffffff-0000-4000-8000-00000000000f</uuid><devices>")
        ghost = conn.add(xml_of("s-1-VM").replace(SSVM, "99999999-0000-4000-8000-000000000009"))
        del conn.domains[ghost.uuid]  # listed, then gone before its XML is read
        conn.domains["99999999-0000-4000-8000-000000000009-listed"] = ghost
        return conn

    inventory = Inventory(opener=FakeOpener(make))
    inventory.refresh()
    assert set(inventory.snapshot()) == {USER_VM, ROUTER, SSVM, LAB}
    assert inventory.errors == 1  # the broken XML; a vanished domain is not an error


@pytest.mark.parametrize(
    ("code", "state"),
    [
        (libvirt.VIR_DOMAIN_NOSTATE, "unknown"),
        (libvirt.VIR_DOMAIN_RUNNING, "running"),
        (libvirt.VIR_DOMAIN_BLOCKED, "running"),
        (libvirt.VIR_DOMAIN_PAUSED, "paused"),
        (libvirt.VIR_DOMAIN_SHUTDOWN, "running"),
        (libvirt.VIR_DOMAIN_SHUTOFF, "shutoff"),
        (libvirt.VIR_DOMAIN_CRASHED, "crashed"),
        (libvirt.VIR_DOMAIN_PMSUSPENDED, "paused"),
        (99, "unknown"),
    ],
)
def test_domain_states(code: int, state: str) -> None:
    assert domain_state(code) == state


def test_start_waits_for_the_first_resync(running: Callable[..., tuple[Inventory, FakeOpener]]) -> None:
    inventory, _ = running(FakeOpener(host))
    assert len(inventory.snapshot()) == 4
    assert inventory.resyncs == 1


def test_an_idle_worker_waits_for_work_or_its_resync_in_one_wait(
    running: Callable[..., tuple[Inventory, FakeOpener]],
) -> None:
    """A wakeup only to look whether to stop costs CPU on every hypervisor: between events the
    worker waits for its next resync (an hour here), and stop() ends that wait."""
    inventory, _ = running(FakeOpener(host), resync_seconds=3600)
    time.sleep(0.2)  # the worker is in its wait
    waits: list[object] = []
    get = inventory._work.get

    def counted(*args: object, **kwargs: object) -> object:
        waits.append(kwargs.get("timeout"))
        return get(*args, **kwargs)  # type: ignore[arg-type]

    inventory._work.get = counted  # type: ignore[method-assign]
    time.sleep(1.5)
    assert waits == []  # still in the same wait
    worker = inventory._thread
    assert worker is not None
    inventory.stop(timeout=5.0)
    assert not worker.is_alive()  # the worker took the stop and ended


def test_lifecycle_event_refreshes_only_that_domain(
    running: Callable[..., tuple[Inventory, FakeOpener]],
) -> None:
    inventory, opener = running(FakeOpener(host), resync_seconds=3600)
    conn = opener.connections[0]
    router = conn.domains[ROUTER]
    user_vm = conn.domains[USER_VM]
    calls_before = (router.xml_calls, user_vm.xml_calls)
    # a hot-plugged NIC: libvirt reports DEVICE_ADDED
    router.xml = router.xml.replace(
        "</devices>",
        "<interface type='bridge'><mac address='1e:00:c8:00:00:99'/><source bridge='cloudbr0'/>"
        "<target dev='vnet9'/></interface></devices>",
    )
    conn.fire(libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED, router, "net3")
    wait_for(lambda: "vnet9" in inventory.by_device())
    assert inventory.by_device()["vnet9"][0].name == "r-5-VM"
    assert router.xml_calls == calls_before[0] + 1
    assert user_vm.xml_calls == calls_before[1]
    assert inventory.resyncs == 1
    # a new VM starts
    copy = xml_of("i-2-10-VM").replace(USER_VM.upper(), "77777777-0000-4000-8000-000000000007")
    new = conn.add(copy.replace("'vnet0'", "'vnet10'").replace("'vnet1'", "'vnet11'"))
    conn.fire(LIFECYCLE, new, libvirt.VIR_DOMAIN_EVENT_STARTED, 0)
    wait_for(lambda: "77777777-0000-4000-8000-000000000007" in inventory.snapshot())
    # a transient VM stops: libvirt forgets it
    del conn.domains[USER_VM]
    conn.fire(LIFECYCLE, user_vm, libvirt.VIR_DOMAIN_EVENT_STOPPED, 0)
    wait_for(lambda: USER_VM not in inventory.snapshot())
    assert "vnet0" not in inventory.by_device()
    assert inventory.resyncs == 1  # all of it without a full resync


def test_periodic_resync_catches_what_no_event_said(
    running: Callable[..., tuple[Inventory, FakeOpener]],
) -> None:
    inventory, opener = running(FakeOpener(host), resync_seconds=0.1)
    conn = opener.connections[0]
    conn.domains[ROUTER].state_code = libvirt.VIR_DOMAIN_PAUSED
    wait_for(lambda: inventory.snapshot()[ROUTER].state == "paused")
    assert inventory.resyncs >= 2


def test_a_resync_keeps_the_objects_of_unchanged_domains() -> None:
    # The poll loop keeps its plan while the domain objects are the same: a periodic resync that
    # finds nothing new must not hand out new ones.
    made: list[FakeConnection] = []

    def make() -> FakeConnection:  # the same domains, the router paused from the second read on
        conn = host()
        if made:
            conn.domains[ROUTER].state_code = libvirt.VIR_DOMAIN_PAUSED
        made.append(conn)
        return conn

    inventory = Inventory("qemu:///system", opener=FakeOpener(make))
    inventory.refresh()
    before = inventory.snapshot()
    inventory.refresh()
    after = inventory.snapshot()
    assert after[ROUTER] is not before[ROUTER]
    assert after[ROUTER].state == "paused"
    assert all(after[uuid] is before[uuid] for uuid in (USER_VM, SSVM, LAB))
    assert inventory.by_device()["vnet0"][0] is before[USER_VM]


def test_reconnects_with_backoff_after_libvirtd_restarts(
    running: Callable[..., tuple[Inventory, FakeOpener]],
) -> None:
    opener = FakeOpener(host)
    inventory, _ = running(opener, resync_seconds=3600)
    first = opener.connections[0]
    known = inventory.snapshot()
    opener.failures = 3  # libvirtd takes a moment to come back
    first.die()
    wait_for(lambda: inventory.reconnects == 1)
    assert inventory.snapshot().keys() == known.keys()  # last state kept throughout
    assert len(opener.calls) == 1 + 3 + 1
    assert first.closed
    second = opener.connections[1]
    assert len(second.callbacks) == 4  # lifecycle, device added/removed, metadata change
    assert second.close_callback is not None
    # the new connection's events work
    second.domains[ROUTER].state_code = libvirt.VIR_DOMAIN_PAUSED
    second.fire(LIFECYCLE, second.domains[ROUTER], libvirt.VIR_DOMAIN_EVENT_SUSPENDED, 0)
    wait_for(lambda: inventory.snapshot()[ROUTER].state == "paused")


def test_dead_connection_found_by_a_failing_call_is_replaced(
    running: Callable[..., tuple[Inventory, FakeOpener]],
) -> None:
    opener = FakeOpener(host)
    inventory, _ = running(opener, resync_seconds=3600)
    first = opener.connections[0]
    first.alive = False  # died without a close callback
    first.fire(LIFECYCLE, first.domains[ROUTER], libvirt.VIR_DOMAIN_EVENT_STOPPED, 0)
    wait_for(lambda: inventory.reconnects == 1)
    assert len(opener.connections) == 2


def test_start_does_not_hang_when_libvirt_is_down(
    running: Callable[..., tuple[Inventory, FakeOpener]],
) -> None:
    opener = FakeOpener(host, failures=10**6)
    started = time.monotonic()
    inventory, _ = running(opener, wait=0.3)
    assert time.monotonic() - started < 1.0
    assert inventory.snapshot() == {}
    assert len(opener.calls) > 1  # still trying


def test_hung_libvirt_never_blocks_snapshot(running: Callable[..., tuple[Inventory, FakeOpener]]) -> None:
    inventory, opener = running(FakeOpener(host), resync_seconds=3600)
    conn = opener.connections[0]
    router = conn.domains[ROUTER]
    router.block = threading.Event()  # e.g. a migration in progress
    conn.fire(LIFECYCLE, router, libvirt.VIR_DOMAIN_EVENT_SUSPENDED, 0)
    wait_for(lambda: router.xml_calls >= 2)  # the worker is now stuck in XMLDesc
    started = time.monotonic()
    for _ in range(100):
        assert len(inventory.snapshot()) == 4
        assert "vnet2" in inventory.by_device()
    assert time.monotonic() - started < 0.5
    router.block.set()


def test_interface_stats_maps_libvirt_fields(running: Callable[..., tuple[Inventory, FakeOpener]]) -> None:
    inventory, opener = running(FakeOpener(host))
    lab = opener.connections[0].domains[LAB]
    # rx_bytes, rx_packets, rx_errs, rx_drop, tx_bytes, tx_packets, tx_errs, tx_drop
    lab.stats["vhu0"] = (1000, 10, 1, 2, 5000, 50, 3, 4)
    assert inventory.interface_stats(LAB, "vhu0") == (1000, 10, 5000, 50)
    assert inventory.interface_stats(LAB, "nope") is None
    assert inventory.interface_stats("00000000-0000-4000-8000-000000000000", "vhu0") is None


def test_interface_stats_gives_up_on_a_hung_libvirt(
    running: Callable[..., tuple[Inventory, FakeOpener]],
) -> None:
    inventory, opener = running(FakeOpener(host))
    lab = opener.connections[0].domains[LAB]
    lab.stats["vhu0"] = (1, 1, 0, 0, 2, 2, 0, 0)
    lab.block = threading.Event()
    try:
        started = time.monotonic()
        assert inventory.interface_stats(LAB, "vhu0", timeout=0.1) is None
        assert time.monotonic() - started < 0.5
        for _ in range(5):  # more stuck calls than allowed: refused at once
            inventory.interface_stats(LAB, "vhu0", timeout=0.05)
        started = time.monotonic()
        assert inventory.interface_stats(LAB, "vhu0", timeout=5.0) is None
        assert time.monotonic() - started < 0.5
        assert inventory.stats_timeouts >= 6
    finally:
        lab.block.set()
    wait_for(lambda: inventory.interface_stats(LAB, "vhu0", timeout=1.0) == (1, 1, 2, 2))


def test_interface_stats_without_connection_is_none() -> None:
    assert Inventory(opener=FakeOpener(host)).interface_stats(LAB, "vhu0") is None


def test_stop_returns_even_when_the_worker_is_stuck() -> None:
    opener = FakeOpener(host)
    inventory = Inventory("fake:///", opener=opener, resync_seconds=3600)
    inventory.start()
    conn = opener.connections[0]
    router = conn.domains[ROUTER]
    router.block = threading.Event()
    conn.fire(LIFECYCLE, router, libvirt.VIR_DOMAIN_EVENT_SUSPENDED, 0)
    wait_for(lambda: router.xml_calls >= 2)
    started = time.monotonic()
    inventory.stop(timeout=0.2)
    assert time.monotonic() - started < 1.0
    router.block.set()


def test_stop_closes_the_connection_and_start_twice_fails(
    running: Callable[..., tuple[Inventory, FakeOpener]],
) -> None:
    inventory, opener = running(FakeOpener(host))
    with pytest.raises(RuntimeError):
        inventory.start()
    inventory.stop()
    assert opener.connections[0].closed
    assert opener.connections[0].callbacks == {}
    assert not inventory.connected
