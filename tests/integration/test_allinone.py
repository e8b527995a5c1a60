"""`kvmeter run --all-in-one` on a simulated host: real traffic, kill -9 and a restart, and the
bytes billed equal the VMs' own kernel counters (the in-process hand-off keeps the spool's
guarantees: nothing lost, nothing billed twice)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest

from kvmeter.collector.model import NETWORK_BYTES_RECEIVED, NETWORK_BYTES_SENT, RUNNING_VM
from kvmeter.collector.store import Store
from kvmeter.pipeline.sim.simevents import EventBus
from tests.harness.netns import Host, Vm
from tests.harness.processes import AllInOneProcess

pytestmark = [pytest.mark.netns, pytest.mark.libvirt]

ACCOUNT = "acc00000-0000-4000-8000-000000000001"
VM_UUID = "a1100000-0000-4000-8000-000000000010"
ROUTER_UUID = "a1100000-0000-4000-8000-000000000005"


def send_all(vms: list[Vm]) -> None:
    for vm in vms:
        vm.send("198.51.100.1", 25_000, nic=len(vm.nics) - 1)


def test_all_in_one_bills_every_byte_once_across_a_crash(
    netns_host: Callable[..., Host], tmp_path: Path
) -> None:
    host = netns_host("aio")
    proc = AllInOneProcess(host, tmp_path, poll=1.0, billable=("public", "guest", "control"))
    now = int(time.time() * 1000)
    bus = EventBus()
    with open(proc.events, "wb") as f:
        for _key, value in (
            bus.vm("VM.CREATE", VM_UUID, ACCOUNT, now - 1000),
            bus.vm("VM.START", VM_UUID, ACCOUNT, now),
        ):
            f.write(value + b"\n")
    vm = host.add_vm("i-2-10-VM", VM_UUID, [("cloudbr0", "02:00:0a:00:00:10", "198.51.100.10/24")])
    router = host.add_vm(
        "r-5-VM",
        ROUTER_UUID,
        [
            ("brvx-5001", "02:00:05:00:00:01", "10.1.1.1/24"),
            ("cloudbr0", "06:00:05:00:00:03", "198.51.100.5/24"),
        ],
    )
    owners = {"r-5-VM": {"ownerAccountUuid": ACCOUNT}}
    host.write_libvirt_xml(proc.libvirt_xml, owners)
    # Taps that exist before a fresh agent starts are baselined: measure from the first poll on.
    baseline = {(v.uuid, i): nic.total() for v in (vm, router) for i, nic in enumerate(v.nics)}
    proc.start()
    try:
        proc.wait_polled()
        for _ in range(4):
            send_all([vm, router])
            time.sleep(0.3)
        proc.kill9()  # mid-traffic: some batches spooled and not yet applied, some applied not acked
        send_all([vm, router])
        proc.start()
        proc.wait_polled()
        for _ in range(4):
            send_all([vm, router])
            time.sleep(0.3)
        time.sleep(2.5)  # quiet: the last bytes are polled
        assert proc.terminate() == 0, proc.logs()
    finally:
        proc.stop()

    kernel: dict[tuple[str, int], int] = defaultdict(int)
    for v in (vm, router):
        for i, nic in enumerate(v.nics):
            now_total, base = nic.total(), baseline[(v.uuid, i)]
            kernel[(v.uuid, NETWORK_BYTES_SENT)] += now_total["tx_bytes"] - base["tx_bytes"]
            kernel[(v.uuid, NETWORK_BYTES_RECEIVED)] += now_total["rx_bytes"] - base["rx_bytes"]
    store = Store(proc.db)
    try:
        net = store.net_usage()
        billed: dict[tuple[str, int], int] = defaultdict(int)
        for key, qty in net.items():
            if key.usage_type in (NETWORK_BYTES_SENT, NETWORK_BYTES_RECEIVED):
                assert key.account == ACCOUNT
                billed[(key.resource, key.usage_type)] += qty
        assert dict(billed) == {k: v for k, v in kernel.items() if v}
        assert kernel[(VM_UUID, NETWORK_BYTES_SENT)] >= 8 * 25_000
        assert any(k.usage_type == RUNNING_VM and k.resource == VM_UUID for k in net)
        stats = store.stats(0)
        assert (stats["parked_bytes"], stats["quarantined_bytes"], stats["dead_letters"]) == (0, 0, 0)
    finally:
        store.close()
