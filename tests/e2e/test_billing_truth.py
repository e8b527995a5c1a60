"""End-to-end billing truth: the whole pipeline under faults, checked against the kernel.

Two simulated hypervisors (network namespaces) joined by a guest VXLAN, each with a public
bridge; alice's VMs and her virtual router (guest, control and public NICs), bob's VM on the
public network. An agent on each host, the real broker, two collector replicas in one consumer
group on PostgreSQL, CloudStack-format lifecycle events on the lifecycle topic, real UDP traffic.

During the run: a VM reboot (veth deleted and recreated), a VM migrated from one host to the
other, `kill -9` of an agent and of a collector replica, the broker unreachable from one host
for 30 s, lifecycle events duplicated and reordered, one lost (bob's VM.CREATE). One replica
reconciles against the CloudStack API double ([cloudstack]): the lost event comes back at
CloudStack's own time, and the router, whose domain has no <metadata> and which no router file
names, is billed to its guest network's owner. After draining:
- for every VM, direction and traffic type, billed bytes equal the VM-side kernel counters
  summed over all of its incarnations, exactly;
- RUNNING_VM (and IP_ADDRESS, and the corrected VM's ALLOCATED_VM) time equals the lifecycle
  script, to the millisecond;
- replaying the topics from offset 0 into an empty store reproduces the same records;
- a truth table (expected, billed, difference) is printed.

A veth (unlike a real tap) loses its receive counter in the delete message, so a VM goes quiet
one poll before its veth is deleted; its receive tail still comes from RTM_DELLINK.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka import Producer

from kvmeter.collector.model import (
    ALLOCATED_VM,
    IP_ADDRESS,
    NETWORK_BYTES_RECEIVED,
    NETWORK_BYTES_SENT,
    RUNNING_VM,
)
from kvmeter.collector.store import Store, reconciliation
from kvmeter.pipeline.sim.simevents import EventBus
from kvmeter.pipeline.sim.simlibvirt import Domain, Nic, write_node_xml
from tests.harness import cloudstack_api as api
from tests.harness.kafka import create_topic
from tests.harness.netns import Host, Lab, Vm
from tests.harness.postgres import create_database
from tests.harness.processes import AgentProcess, CollectorProcess, wait_drained
from tests.harness.truth import billed, truth_table

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.broker, pytest.mark.pg, pytest.mark.libvirt]

POLL = 1.0
WINDOW_S = 60
ALL_TYPES = ("public", "guest", "management", "storage", "control", "private_gateway")
BRIDGE_TYPE = {"brvx-5001": "guest", "cloud0": "control", "cloudbr0": "public"}
ALICE = "5a1ce000-0000-4000-8000-00000000a11c"
BOB = "b0b00000-0000-4000-8000-000000000b0b"
ADMIN = "ad000000-0000-4000-8000-0000000000ad"
HOUR_MS = 3_600_000

# name -> (uuid, account, NICs as (bridge, MAC, address), first host)
VMS = {
    "i-2-10-VM": (
        "e2e00000-0000-4000-8000-000000000010",
        ALICE,
        [("brvx-5001", "02:00:0a:00:00:10", "10.1.1.10/24")],
        "h1",
    ),
    "i-2-12-VM": (
        "e2e00000-0000-4000-8000-000000000012",
        ALICE,
        [("brvx-5001", "02:00:0a:00:00:12", "10.1.1.12/24")],
        "h2",
    ),
    "r-5-VM": (
        "e2e00000-0000-4000-8000-000000000005",
        ALICE,
        [
            ("brvx-5001", "02:00:05:00:00:01", "10.1.1.1/24"),  # eth0 guest
            ("cloud0", "0e:00:a9:fe:00:05", "169.254.3.5/16"),  # eth1 control
            ("cloudbr0", "06:00:05:00:00:03", "198.51.100.5/24"),  # eth2 public
        ],
        "h1",
    ),
    "i-3-11-VM": (
        "e2e00000-0000-4000-8000-000000000011",
        BOB,
        [("cloudbr0", "02:00:0b:00:00:11", "198.51.100.11/24")],
        "h2",
    ),
}
GUEST_NETWORK = "e2e00000-0000-4000-8000-00000000ne71"
# Who talks to whom every tick: (vm, nic index, destination, bytes)
FLOWS = [
    ("i-2-10-VM", 0, "10.1.1.1", 30_000),  # guest, to the router
    ("i-2-12-VM", 0, "10.1.1.10", 20_000),  # guest, across the VXLAN until it migrates
    ("r-5-VM", 2, "198.51.100.1", 50_000),  # public, out of the router
    ("r-5-VM", 1, "169.254.0.1", 3_000),  # control, to the host
    ("i-3-11-VM", 0, "198.51.100.1", 40_000),  # public, bob's own
]


class Cloud:
    """The two hosts, their VMs, and the traffic between them."""

    def __init__(self, lab: Lab):
        self.h1, self.h2 = lab.add_host("h1"), lab.add_host("h2")
        for a, b in ((self.h1, self.h2), (self.h2, self.h1)):
            a.join_vxlan(5001, [b])
        self.hosts = {"h1": self.h1, "h2": self.h2}
        self.vms: dict[str, Vm] = {}
        self.quiet: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors: list[BaseException] = []

    def write_libvirt(self, host: Host, path: Path) -> None:
        """Each host's test driver knows every VM that may run on it (the migrated one on both)."""
        names = [n for n, spec in VMS.items() if spec[3] == host.name] + (
            ["i-2-12-VM"] if host is self.h1 else []
        )
        domains = []
        for name in names:
            vm_uuid, _account, nics, _ = VMS[name]
            # No <metadata> (releases before 4.21): the router's owner comes from reconciliation.
            domains.append(Domain(name, vm_uuid, tuple(Nic(mac=m, bridge=b) for b, m, _ in nics)))
        write_node_xml(path, domains)

    def boot_all(self) -> None:
        for name, (vm_uuid, _account, nics, host) in VMS.items():
            self.vms[name] = self.hosts[host].add_vm(name, vm_uuid, nics)

    def _traffic(self) -> None:
        while not self._stop.is_set():
            tick = time.monotonic()
            for name, nic, dst, nbytes in FLOWS:
                vm = self.vms[name]
                if name not in self.quiet and vm.present:
                    try:
                        vm.send(dst, nbytes, nic=nic)
                    except Exception as exc:  # a VM being moved right now: next tick
                        if vm.present and name not in self.quiet:
                            self.errors.append(exc)
            self._stop.wait(max(0.0, 0.5 - (time.monotonic() - tick)))

    def start_traffic(self) -> None:
        self._thread = threading.Thread(target=self._traffic, name="traffic", daemon=True)
        self._thread.start()

    def stop_traffic(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def quiesce(self, name: str) -> None:
        """The guest stops sending and the agent polls once more (see the module's note)."""
        self.quiet.add(name)
        time.sleep(0.6 + 2.5 * POLL)

    def kernel(self) -> dict[tuple[str, int, str], int]:
        """VM-side kernel counters over every incarnation: (vm uuid, usage type, traffic type)."""
        out: dict[tuple[str, int, str], int] = defaultdict(int)
        for vm in self.vms.values():
            for nic in vm.nics:
                total = nic.total()
                traffic = BRIDGE_TYPE[nic.bridge]
                out[(vm.uuid, NETWORK_BYTES_SENT, traffic)] += total["tx_bytes"]
                out[(vm.uuid, NETWORK_BYTES_RECEIVED, traffic)] += total["rx_bytes"]
        return dict(out)


class Script:
    """A lifecycle in the past hours, with a cut-off: records of windows ending by then are exact."""

    def __init__(self, now_ms: int):
        self.t0 = (now_ms // HOUR_MS - 3) * HOUR_MS  # three hours ago, on the hour
        self.cutoff = self.t0 + 150 * 60_000  # 2.5 h later, on a window boundary
        t0 = self.t0
        bus = EventBus(offset_minutes=330)  # a management server in UTC+05:30
        u10, u12, u11 = (VMS[n][0] for n in ("i-2-10-VM", "i-2-12-VM", "i-3-11-VM"))
        ip_bob = "1b000000-0000-4000-8000-000000000011"
        self.records = [
            bus.vm("VM.CREATE", u10, ALICE, t0 + 30_000, "small"),
            bus.vm("VM.START", u10, ALICE, t0 + 37_000, "small"),
            bus.vm("VM.STOP", u10, ALICE, t0 + HOUR_MS + 13_000, "small"),
            bus.vm("VM.START", u10, ALICE, t0 + HOUR_MS + 20 * 60_000 + 7_000, "small"),
            bus.vm("VM.CREATE", u12, ALICE, t0 + 60_000, "small"),
            bus.vm("VM.START", u12, ALICE, t0 + 61_000, "small"),
            bus.action("VM.MIGRATE", "VirtualMachine", u12, ADMIN, t0 + 2 * HOUR_MS),  # caller, not owner
            # bob's VM.CREATE (t0 + 90 s) is lost on the bus; reconciliation brings it back
            bus.vm("VM.START", u11, BOB, t0 + 95_000, "large"),
            bus.ip("NET.IPASSIGN", ip_bob, BOB, t0 + 100_000, "198.51.100.11"),
        ]
        # expected time up to the cut-off, in ms
        self.running = {
            u10: (HOUR_MS + 13_000 - 37_000) + (150 * 60_000 - (HOUR_MS + 20 * 60_000 + 7_000)),
            u12: 150 * 60_000 - 61_000,
            u11: 150 * 60_000 - 95_000,
        }
        self.ip_time = {ip_bob: 150 * 60_000 - 100_000}
        self.allocated_bob = {u11: 150 * 60_000 - 90_000}
        # What CloudStack's API says now (the double serves it).
        self.cloud = api.empty_cloud()
        self.cloud["listAccounts"] = [api.account(ALICE, "alice"), api.account(BOB, "bob")]
        self.cloud["listDomains"] = [api.domain()]
        self.cloud["listServiceOfferings"] = [
            api.offering("small", "small", 1, 512),
            api.offering("large", "large", 2, 2048),
        ]
        self.cloud["listVirtualMachines"] = [
            api.vm(u10, "i-2-10-VM", "alice", "Running", "small", t0 + 30_000),
            api.vm(u12, "i-2-12-VM", "alice", "Running", "small", t0 + 60_000),
            api.vm(u11, "i-3-11-VM", "bob", "Running", "large", t0 + 90_000),
        ]
        self.cloud["listNetworks"] = [api.network(GUEST_NETWORK, "alice-guest", "alice")]
        self.cloud["listRouters"] = [
            api.router(VMS["r-5-VM"][0], "r-5-VM", network_id=GUEST_NETWORK, created_ms=t0)
        ]
        self.cloud["listPublicIpAddresses"] = [api.public_ip(ip_bob, "198.51.100.11", "bob", t0 + 100_000)]

    def delivered_messily(self) -> list[tuple[bytes, bytes]]:
        """Every record twice, in a shuffled order (CloudStack's bus gives no order guarantee)."""
        records = self.records * 2
        random.Random(7).shuffle(records)
        return records


def publish(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    for key, value in records:
        producer.produce(topic, key=key, value=value)
    assert producer.flush(30) == 0


def time_usage(store: Store, usage_type: int, cutoff: int) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for key, qty in store.net_usage().items():
        if key.usage_type == usage_type and key.window_end_ms <= cutoff:
            out[key.resource] += qty
    return dict(out)


def closed_records(store: Store, cutoff: int) -> dict[object, int]:
    """Byte records, and time records of windows ended by the cut-off (open ones still grow)."""
    return {
        k: v
        for k, v in store.net_usage().items()
        if k.usage_type in (NETWORK_BYTES_SENT, NETWORK_BYTES_RECEIVED) or k.window_end_ms <= cutoff
    }


@pytest.fixture
def stores(pg_dsn: str) -> Iterator[Callable[[], tuple[str, Store]]]:
    opened: list[Store] = []

    def make() -> tuple[str, Store]:
        dsn = create_database(pg_dsn)
        store = Store(dsn)
        store.migrate()
        opened.append(store)
        return dsn, store

    yield make
    for s in opened:
        s.close()


def test_billing_truth_under_faults(
    netns_lab: Lab, lab_broker: str, stores: Callable[[], tuple[str, Store]], tmp_path: Path
) -> None:
    bootstrap = lab_broker
    measures, lifecycle = f"measures-{uuid.uuid4().hex[:6]}", f"cloudstack-{uuid.uuid4().hex[:6]}"
    create_topic(bootstrap, measures, partitions=4)
    create_topic(bootstrap, lifecycle, partitions=2)
    dsn, store = stores()
    cloud = Cloud(netns_lab)
    script = Script(int(time.time() * 1000))
    double = api.CloudStackApiDouble(script.cloud).__enter__()
    reconciling = (
        f'[cloudstack]\nendpoint = "{double.endpoint}"\napi_key = "{api.API_KEY}"\n'
        f'secret_key = "{api.SECRET}"\nperiod_seconds = 1\n'
    )
    collectors = [
        CollectorProcess(
            name, tmp_path / name, db=dsn, bootstrap=bootstrap, measures=measures, lifecycle=lifecycle,
            group="billing", window_seconds=WINDOW_S, billable=ALL_TYPES,
            extra=reconciling if name == "replica-a" else "",  # one replica reconciles
        )
        for name in ("replica-a", "replica-b")
    ]  # fmt: skip
    agents = {}
    for name, host in cloud.hosts.items():
        agent = AgentProcess(host, tmp_path / f"agent-{name}", bootstrap=bootstrap, topic=measures, poll=POLL)
        cloud.write_libvirt(host, agent.libvirt_xml)
        agents[name] = agent
    processes = [*collectors, *agents.values()]
    try:
        for c in collectors:
            c.start()
        publish(bootstrap, lifecycle, script.delivered_messily())
        for a in agents.values():
            a.start()
        for a in agents.values():
            a.wait_polled()  # first polls done: every tap from now on is born while metered
        cloud.boot_all()
        cloud.start_traffic()
        time.sleep(3)

        # a VM reboot: its taps are deleted and recreated under the same names
        cloud.quiesce("i-2-10-VM")
        cloud.h1.reboot(cloud.vms["i-2-10-VM"])
        cloud.quiet.discard("i-2-10-VM")
        time.sleep(2)

        # kill -9 of the agent on h1 mid-traffic, and its restart
        agents["h1"].kill9()
        time.sleep(2)
        agents["h1"].start()
        time.sleep(2)

        # a migration from h2 to h1
        cloud.quiesce("i-2-12-VM")
        cloud.h2.migrate(cloud.vms["i-2-12-VM"], cloud.h1)
        cloud.quiet.discard("i-2-12-VM")
        time.sleep(2)

        # kill -9 of a collector replica; the other takes over, the replica comes back
        collectors[0].kill9()
        time.sleep(3)
        collectors[0].start()

        # the broker unreachable from h2 for 30 s: h2's agent spools, then drains in order
        cloud.h2.mgmt_down()
        time.sleep(30)
        cloud.h2.mgmt_up()
        time.sleep(5)

        # drain: traffic stops, agents make their last polls and flush, collectors catch up
        cloud.stop_traffic()
        assert not cloud.errors, cloud.errors
        time.sleep(3 * POLL)
        for a in agents.values():
            assert a.terminate() == 0, a.logs()
        expected = cloud.kernel()
        wait_drained(bootstrap, "billing", measures)
        time.sleep(3)  # a tick after the last commit

        got = billed(store)
        print(
            "\nBilling truth (bytes; every traffic type billable in this test):\n"
            + truth_table(expected, got, {spec[0]: name for name, spec in VMS.items()})
        )
        stats = store.stats(0)
        assert stats["parked_bytes"] == 0, "bytes left without an owner"
        assert stats["quarantined_bytes"] == 0
        assert stats["dead_letters"] == 0
        assert got == {k: v for k, v in expected.items() if v}
        assert len(got) >= 12  # every VM NIC moved bytes both ways

        # lifecycle time to the millisecond, despite duplicates, reordering and the caller's event
        assert time_usage(store, RUNNING_VM, script.cutoff) == script.running
        assert time_usage(store, IP_ADDRESS, script.cutoff) == script.ip_time

        # the lost VM.CREATE back at CloudStack's time; the router billed to its network's owner
        bob_vm, router = VMS["i-3-11-VM"][0], VMS["r-5-VM"][0]
        allocated = time_usage(store, ALLOCATED_VM, script.cutoff)
        assert {bob_vm: allocated.get(bob_vm)} == script.allocated_bob
        with store.read() as conn:
            corrections = {
                (r["event_type"], r["resource"], r["account"]) for r in reconciliation.list_corrections(conn)
            }
        assert ("VM.CREATE", bob_vm, BOB) in corrections
        assert ("ROUTER.OWNER", router, ALICE) in corrections
        router_accounts = {k.account for k in store.net_usage() if k.resource == router}
        assert router_accounts == {ALICE}
        assert double.refused == []

        # replay both topics from offset 0 into an empty store: the same records
        replay_dsn, replay = stores()
        replayer = CollectorProcess(
            "replay", tmp_path / "replay", db=replay_dsn, bootstrap=bootstrap, measures=measures,
            lifecycle=lifecycle, group="replay", window_seconds=WINDOW_S, billable=ALL_TYPES,
            extra=reconciling,  # the corrections are not on the topics: the API gives them again
        )  # fmt: skip
        processes.append(replayer)
        replayer.start()
        wait_drained(bootstrap, "replay", measures)
        want = closed_records(store, script.cutoff)
        deadline = time.monotonic() + 30  # two reconciliation passes after the catch-up
        while closed_records(replay, script.cutoff) != want and time.monotonic() < deadline:
            time.sleep(1)
        assert closed_records(replay, script.cutoff) == want
    except BaseException:
        for p in processes:
            print(p.logs())
        raise
    finally:
        cloud.stop_traffic()
        for p in processes:
            p.stop()
        double.__exit__(None, None, None)
