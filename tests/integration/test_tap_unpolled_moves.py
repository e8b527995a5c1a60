"""A VM's tap created (and carrying traffic) and then moved to another bridge before the
agent's first poll of it, on the real kernel: real bridges, a real VXLAN uplink, a real tap held
open as QEMU holds it, the agent's real topology and counter table, its traffic rules from a
TOML file. The move's message carries the tap's counters: the bytes up to it are the first
bridge's, from a newborn counter's zero; and a tap deleted before its first poll is typed by the
bridge it sat on, not by the one the new link under its name sits on (a NIC re-plugged)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from kvmeter.agent.daemon import Agent
from kvmeter.agent.delta import DeltaEngine
from kvmeter.agent.model import CounterKey, CounterSample, NicInfo
from kvmeter.proto import pb
from tests.integration.test_tap_move_edges import agent_over, moves, told, vm_sends, vm_tx_by_type
from tests.integration.test_topology_netns import (
    FRAME,
    host,  # noqa: F401  (the fixture: cloud0, cloudbr0, brvx-1001 over vxlan1001)
    ip,
    vm_tap,
    wait_until,
)

pytestmark = pytest.mark.netns

TAP_MAC = "fe:00:00:00:00:02"
NIC_MAC = "02:00:00:00:00:02"


@pytest.fixture
def agent(tmp_path: Path, host: str) -> Iterator[Agent]:  # noqa: F811
    """An agent over the namespace, polled once, with one VM whose NIC names vnet1, a tap not
    made yet (the VM starts after the agent's last poll)."""
    nic = NicInfo(mac=NIC_MAC, device="vnet1", nic_type="bridge", bridge="cloudbr0")
    running = agent_over(tmp_path, host, nic, "u-2", {"vnet1": TAP_MAC})
    running.start()
    try:
        running.poll_once()  # before the VM starts
        yield running
    finally:
        running.close()


@contextmanager
def vm_started_on(host: str, bridge: str) -> Iterator[int]:  # noqa: F811
    """The VM's tap vnet1 made and plugged into `bridge`, as libvirt does it (its fd open)."""
    with vm_tap(host, "vnet1") as fd:
        ip("-n", host, "link", "set", "vnet1", "address", TAP_MAC)
        ip("-n", host, "link", "set", "vnet1", "master", bridge)
        ip("-n", host, "link", "set", "vnet1", "up")
        yield fd


@pytest.mark.parametrize("detached_first", [False, True], ids=["master", "nomaster-then-master"])
def test_a_tap_made_and_moved_before_its_first_poll_bills_its_bytes_before_the_move_to_the_bridge_it_left(
    agent: Agent,
    host: str,  # noqa: F811
    detached_first: bool,
) -> None:
    """A VM starts on cloudbr0 (public) after the agent's last poll, sends, and its tap moves to
    brvx-1001 (guest, VNI 1001) before the next poll: the bytes before the move are public,
    those after it guest. The move's message carries the tap's counters, but the agent split
    only counters it had read already: the whole newborn count went as guest (public bytes
    billed as guest, the billable public traffic lost from the bill)."""
    with vm_started_on(host, "cloudbr0") as fd:
        wait_until(lambda: agent.topology.placement("vnet1").bridge == "cloudbr0")
        vm_sends(fd, 5)  # on cloudbr0
        if detached_first:
            ip("-n", host, "link", "set", "vnet1", "nomaster")
        ip("-n", host, "link", "set", "vnet1", "master", "brvx-1001")
        wait_until(lambda: agent.topology.placement("vnet1").bridge == "brvx-1001")
        told(agent, "move")
        vm_sends(fd, 7)  # on brvx-1001
        assert vm_tx_by_type(agent.poll_once()) == {pb.PUBLIC: 5 * FRAME, pb.GUEST: 7 * FRAME}
        vm_sends(fd, 3)
        assert vm_tx_by_type(agent.poll_once()) == {pb.GUEST: 3 * FRAME}


def test_a_tap_made_and_moved_away_and_back_before_its_first_poll_bills_each_stretch_as_its_bridge(
    agent: Agent,
    host: str,  # noqa: F811
) -> None:
    """A VM starts on cloudbr0 (public) after the agent's last poll, and its tap goes to
    brvx-1001 (guest) and back before the next poll: the bytes on brvx-1001 are guest, the
    others public. The first move's message split nothing (the counter not read yet): every
    byte went as public."""
    with vm_started_on(host, "cloudbr0") as fd:
        wait_until(lambda: agent.topology.placement("vnet1").bridge == "cloudbr0")
        vm_sends(fd, 5)  # on cloudbr0
        ip("-n", host, "link", "set", "vnet1", "master", "brvx-1001")
        wait_until(lambda: moves(agent) == 1)
        vm_sends(fd, 7)  # on brvx-1001
        ip("-n", host, "link", "set", "vnet1", "master", "cloudbr0")
        wait_until(lambda: moves(agent) == 2)
        vm_sends(fd, 4)  # on cloudbr0 again
        assert vm_tx_by_type(agent.poll_once()) == {pb.PUBLIC: 9 * FRAME, pb.GUEST: 7 * FRAME}


def test_a_tap_made_and_replugged_before_its_first_poll_bills_its_bytes_as_the_bridge_it_sat_on(
    agent: Agent,
    host: str,  # noqa: F811
) -> None:
    """A VM starts on cloudbr0 (public) after the agent's last poll, sends, and its NIC is
    re-plugged onto brvx-1001 (guest) before the next poll, as CloudStack's ReplugNicCommand does
    on KVM: libvirt detaches the NIC (its tap is deleted, the final counters in the kernel's
    message) and attaches a new one under the old tap's name. The first tap's bytes are public,
    the new one's guest. The first tap had no attribution from a poll, and the one its NIC gave
    it at the deletion was placed where the link now under its name sits (brvx-1001): its public
    bytes were billed as guest."""
    with vm_started_on(host, "cloudbr0") as fd:
        wait_until(lambda: agent.topology.placement("vnet1").bridge == "cloudbr0")
        vm_sends(fd, 5)  # on cloudbr0
    wait_until(lambda: agent.topology.ifindex("vnet1") is None)
    told(agent, "del")
    with vm_started_on(host, "brvx-1001") as fd:
        wait_until(lambda: agent.topology.placement("vnet1").bridge == "brvx-1001")
        vm_sends(fd, 7)  # the new tap, on brvx-1001
        assert vm_tx_by_type(agent.poll_once()) == {pb.PUBLIC: 5 * FRAME, pb.GUEST: 7 * FRAME}


def test_the_engine_counts_a_counter_born_since_the_last_poll_from_zero_up_to_its_move() -> None:
    """DeltaEngine.moved of a counter born while accounting and not read yet: the delta from
    zero up to the move's reading (the bridge it left), from the last poll on; the next poll
    counts from that reading, so nothing is billed twice or lost. One held this poll (its owner
    not known yet) or whose name's older incarnation is still open is left to the poll's rules,
    as before. Before, moved() split tracked counters only and the whole count went to the poll."""
    engine = DeltaEngine("b")
    old, held, born = CounterKey("b", 5, "vnet5"), CounterKey("b", 6, "vnet6"), CounterKey("b", 7, "vnet7")
    engine.poll(1_000, 1_000, [CounterSample(old, 10, 10, 1, 1)], present=[old])
    engine.links_created([born, held, CounterKey("b", 8, "vnet5")])
    engine.hold([held])
    assert engine.moved(2_000, 2_000, CounterSample(held, 100, 0, 1, 0)) is None
    assert engine.moved(2_000, 2_000, CounterSample(CounterKey("b", 8, "vnet5"), 100, 0, 1, 0)) is None
    split = engine.moved(3_000, 3_000, CounterSample(born, 500, 20, 5, 1))
    assert split is not None
    assert (split.start_ms, split.end_ms, split.rx_bytes, split.tx_bytes) == (1_000, 3_000, 500, 20)
    (after,) = engine.poll(11_000, 11_000, [CounterSample(born, 800, 20, 8, 1)], present=[old, born])
    assert (after.start_ms, after.end_ms, after.rx_bytes, after.tx_bytes) == (3_000, 11_000, 300, 0)
