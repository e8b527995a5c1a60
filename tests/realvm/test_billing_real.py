"""Billing truth on real guests: QEMU VMs on a real libvirtd, the agent, the broker, a collector.

One simulated KVM host runs four CloudStack-shaped guests on its bridges: bob's VM on the public
bridge, alice's two VMs on the guest network and her virtual router (guest, control and public
NICs). The guests ping their peers (the host's bridge addresses, or the router) and the host
sends UDP to two of them, so bytes move both ways at different rates. During the run:

* `kill -9` of the agent while the guests send, and its restart;
* `virsh destroy` of a VM right after an agent poll: the bytes since that poll, in both
  directions, are only in the tap's delete message;
* a guest powering itself off right after a poll: likewise, and the guest's own last counters
  (printed to its serial console just before it powers off) match the tap's final ones;
* a reboot across a libvirtd restart: the VM's new tap has its old `vnetN` name (libvirt reuses
  it) and a new ifindex, while the router keeps running and the agent reconnects.

At the end every guest is destroyed, so each tap's whole life is in its RTM_DELLINK (recorded by
a watcher of our own): billed bytes per VM, direction and traffic type must equal the sum of
those final tap counters, exactly.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmeter.collector.model import NETWORK_BYTES_RECEIVED, NETWORK_BYTES_SENT
from kvmeter.collector.store import Store
from kvmeter.pipeline.sim.simlibvirt import tap_mac
from tests.harness.kafka import create_topic
from tests.harness.postgres import create_database
from tests.harness.processes import AgentProcess, CollectorProcess, wait_drained
from tests.harness.realvm import GUEST_PEER, Guest, GuestNic, LinkWatch, RealHost, TapRecord, wait_until
from tests.harness.truth import Usage, billed, truth_table

pytestmark = [pytest.mark.realvm, pytest.mark.netns, pytest.mark.broker, pytest.mark.pg]

POLL = 4.0  # long enough that a destroy or a poweroff right after a poll finishes before the next
ALL_TYPES = ("public", "guest", "management", "storage", "control", "private_gateway")
TRAFFIC = {"brvx-5001": "guest", "cloud0": "control", "cloudbr0": "public"}
ALICE = "5a1ce000-0000-4000-8000-00000000a11c"
BOB = "b0b00000-0000-4000-8000-000000000b0b"


def owner(account: str, name: str) -> dict[str, str]:
    return {"ownerAccountUuid": account, "ownerAccountName": name}


BOB_VM = Guest(
    "i-3-11-VM",
    "ea000000-0000-4000-8000-000000000011",
    (GuestNic("cloudbr0", "02:00:0b:00:00:11", "198.51.100.11/24", "198.51.100.1"),),
    owner=owner(BOB, "bob"),
)
ALICE_VM = Guest(
    "i-2-10-VM",
    "ea000000-0000-4000-8000-000000000010",
    (GuestNic("brvx-5001", "02:00:0a:00:00:10", "10.1.1.10/24", GUEST_PEER),),
    owner=owner(ALICE, "alice"),
    ping_size=1400,
)
ROUTER = Guest(
    "r-5-VM",
    "ea000000-0000-4000-8000-000000000005",
    (
        GuestNic("brvx-5001", "02:00:05:00:00:01", "10.1.1.1/24", GUEST_PEER),  # eth0 guest
        GuestNic("cloud0", "0e:00:a9:fe:00:05", "169.254.3.5/16", "169.254.0.1"),  # eth1 control
        GuestNic("cloudbr0", "06:00:05:00:00:03", "198.51.100.5/24", "198.51.100.1"),  # eth2 public
    ),
    owner=owner(ALICE, "alice"),
    ping_size=600,
)
REBOOTED = Guest(  # pings the router across the guest network
    "i-2-12-VM",
    "ea000000-0000-4000-8000-000000000012",
    (GuestNic("brvx-5001", "02:00:0a:00:00:12", "10.1.1.12/24", "10.1.1.1"),),
    owner=owner(ALICE, "alice"),
    ping_size=200,
)
GUESTS = (BOB_VM, ALICE_VM, ROUTER, REBOOTED)
# host -> guest UDP every half second: (from, to)
HOST_SENDS = {BOB_VM.name: ("198.51.100.1", "198.51.100.11"), ALICE_VM.name: (GUEST_PEER, "10.1.1.10")}


class HostTraffic:
    """The host sends UDP to some guests until told to stop (per guest)."""

    def __init__(self, host: RealHost):
        self.host = host
        self.targets = dict(HOST_SENDS)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, name="host-traffic", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                targets = list(self.targets.values())
            for src, dst in targets:
                try:
                    self.host.send_udp(src, dst, 6000)
                except Exception as exc:
                    self.errors.append(exc)

    def drop(self, name: str) -> None:
        with self._lock:  # a send under way ends before this returns
            self.targets.pop(name, None)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def truth(deleted: list[TapRecord]) -> Usage:
    """What every tap counted over its whole life, by (VM, direction, traffic type), VM's view."""
    nics = {tap_mac(n.mac): (g.uuid, TRAFFIC[n.bridge]) for g in GUESTS for n in g.nics}
    out: Usage = defaultdict(int)
    for rec in deleted:
        vm, traffic = nics[rec.mac]
        assert rec.rx_bytes is not None, f"{rec} carries no counters"
        assert rec.tx_bytes is not None, f"{rec} carries no counters"
        out[(vm, NETWORK_BYTES_SENT, traffic)] += rec.rx_bytes
        out[(vm, NETWORK_BYTES_RECEIVED, traffic)] += rec.tx_bytes
    return dict(out)


@pytest.fixture
def store(pg_dsn: str) -> Iterator[tuple[str, Store]]:
    dsn = create_database(pg_dsn)
    s = Store(dsn)
    s.migrate()
    yield dsn, s
    s.close()


def tail_after_poll(agent: AgentProcess, host: RealHost, watch: LinkWatch, name: str, stop: str) -> TapRecord:
    """Right after an agent poll, end guest ``name`` (``stop``: "destroy" or "poweroff"); its tap's
    delete message must carry bytes in both directions that no poll saw."""
    (tap,) = host.taps(name)
    agent.wait_polled()
    seen = host.tap_counters(tap.ifname)  # at least what that poll read
    spooled = agent.spooled()

    def moved_both_ways() -> bool:
        now = host.tap_counters(tap.ifname)
        return now["rx_bytes"] > seen["rx_bytes"] and now["tx_bytes"] > seen["tx_bytes"]

    wait_until(moved_both_ways, POLL / 2, f"traffic of {name} both ways")
    if stop == "destroy":
        host.destroy(name)
    else:
        host.poweroff(name)
    final = watch.wait_deleted(tap.ifindex)
    assert agent.spooled() == spooled, "the agent polled before the tap went: no tail to prove"
    assert final.rx_bytes is not None
    assert final.tx_bytes is not None
    assert final.rx_bytes > seen["rx_bytes"], "the VM sent after the last poll"
    assert final.tx_bytes > seen["tx_bytes"], "the VM received after the last poll"
    return final


def test_billing_truth_on_real_guests(
    guests: RealHost, realvm_broker: str, store: tuple[str, Store], tmp_path: Path
) -> None:
    host = guests
    measures, lifecycle = f"measures-{uuid.uuid4().hex[:6]}", f"cloudstack-{uuid.uuid4().hex[:6]}"
    create_topic(realvm_broker, measures, partitions=2)
    create_topic(realvm_broker, lifecycle)
    dsn, db = store
    collector = CollectorProcess(
        "collector", tmp_path / "collector", db=dsn, bootstrap=realvm_broker, measures=measures,
        lifecycle=lifecycle, group="billing", billable=ALL_TYPES,
    )  # fmt: skip
    agent = AgentProcess(
        host.host, tmp_path / "agent", bootstrap=realvm_broker, topic=measures, poll=POLL,
        libvirt_uri=host.libvirtd.readonly_uri,
    )  # fmt: skip
    watch = LinkWatch(host.ns)
    traffic: HostTraffic | None = None
    try:
        collector.start()
        agent.start()
        agent.wait_polled()
        for guest in GUESTS:
            host.define(guest)
        # bob's VM first and alone on its way up: nothing reaches its tap before its NIC is up,
        # so its own counters and its tap's agree exactly
        host.start(BOB_VM.name)
        host.wait_up(BOB_VM.name)
        for guest in (ALICE_VM, ROUTER, REBOOTED):  # REBOOTED last: the highest vnetN
            host.start(guest.name)
        for guest in GUESTS:
            host.wait_up(guest.name)
        traffic = HostTraffic(host)
        agent.wait_polled()

        # kill -9 of the agent while the guests send; it restarts from its spool and state
        agent.kill9()
        time.sleep(2)
        agent.start()
        agent.wait_polled()

        # the tail at `virsh destroy`, both directions
        tail_after_poll(agent, host, watch, ALICE_VM.name, "destroy")

        # the tail at a guest's own poweroff, both directions; the guest's counters agree
        traffic.drop(BOB_VM.name)
        final = tail_after_poll(agent, host, watch, BOB_VM.name, "poweroff")
        host.wait_state(BOB_VM.name, "shut off")
        (own,) = host.guest_lines(BOB_VM.name, "final")
        assert own["eth0"] == {"rx_bytes": final.tx_bytes, "tx_bytes": final.rx_bytes}

        # a reboot across a libvirtd restart (the router keeps running): same vnetN, new ifindex
        (before,) = host.taps(REBOOTED.name)
        host.destroy(REBOOTED.name)
        watch.wait_deleted(before.ifindex)
        host.libvirtd.restart()
        (after,) = host.start(REBOOTED.name)
        assert after.ifname == before.ifname
        assert after.ifindex != before.ifindex
        host.wait_up(REBOOTED.name)
        agent.wait_polled()
        agent.wait_polled()

        # the end: every tap goes, the agent polls once more and stops; the collector catches up
        traffic.stop()
        assert not traffic.errors, traffic.errors
        for guest in (ROUTER, REBOOTED):
            taps = host.taps(guest.name)
            host.destroy(guest.name)
            for tap in taps:
                watch.wait_deleted(tap.ifindex)
        agent.wait_polled()
        assert agent.terminate() == 0, agent.logs()
        wait_drained(realvm_broker, "billing", measures)
        time.sleep(3)  # a collector tick after its last commit

        expected = truth(watch.deleted())
        got = billed(db)
        print(
            "\nBilling truth on real guests (bytes; VM's point of view):\n"
            + truth_table(expected, got, {g.uuid: g.name for g in GUESTS}, "TAPS")
        )
        assert len(watch.deleted()) == 7  # 1 + 1 + 3 + 2 taps
        stats = db.stats(0)
        assert stats["parked_bytes"] == 0
        assert stats["quarantined_bytes"] == 0
        assert stats["dead_letters"] == 0
        assert got == expected
        assert len(got) == 12  # six NICs of four VMs, both directions, none idle
    except BaseException:
        print(agent.logs(), collector.logs(), host.libvirtd.logs(), sep="\n")
        raise
    finally:
        if traffic is not None:
            traffic.stop()
        watch.close()
        agent.stop()
        collector.stop()
