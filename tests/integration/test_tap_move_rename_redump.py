"""A running VM's tap moved to another bridge between two polls in the cases the move's own
message does not reach the agent as a move of the link it metered: renamed before the move (in
one read of the event socket or in two). Real bridges, a real VXLAN uplink, a real tap held
open as QEMU holds it, the agent's real topology and counter table, its rules from a TOML file."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest

from kvmeter.agent.daemon import Agent
from kvmeter.proto import pb
from tests.integration.test_tap_move_edges import (
    agent_on,  # noqa: F401  (the fixture)
    running_agent,
    told,
    vm_sends,
    vm_tx_by_type,
)
from tests.integration.test_topology_netns import (
    FRAME,
    host,  # noqa: F401  (the fixture: cloud0, cloudbr0, brvx-1001 over vxlan1001)
    ip,
    wait_until,
)

pytestmark = pytest.mark.netns


def held(agent: Agent, host: str, release: threading.Event) -> None:  # noqa: F811
    """Hold the topology's thread on a link event of its own until `release`: what the kernel
    sends meanwhile queues on the event socket (one read, or an overrun)."""
    agent.topology.add_listener(lambda e: release.wait(5) if e.ifname == "hold0" else None)
    ip("-n", host, "tuntap", "add", "dev", "hold0", "mode", "tap")
    wait_until(lambda: agent.topology.ifindex("hold0") is not None)


@pytest.mark.parametrize("one_read", [False, True], ids=["two-reads", "one-read"])
def test_a_tap_renamed_then_moved_between_two_polls_bills_its_bytes_before_the_move_to_the_bridge_it_left(
    agent_on: tuple[Agent, int],  # noqa: F811
    host: str,  # noqa: F811
    one_read: bool,
) -> None:
    """A VM's tap is renamed (vnet0 -> tap-x) and then moved from cloudbr0 (public) to
    brvx-1001 (guest, VNI 1001) between two polls: the bytes before the move are public, those
    after it guest, as for a tap moved under its own name. The agent looked up the attribution
    the last poll gave the link by its new name (none: the last poll knew it as vnet0) and typed
    the whole poll as guest; and when both messages came in one read of the event socket (the
    rename's superseded by the move's), the table told a rename and no move at all."""
    agent, fd = agent_on
    agent.poll_once()  # the baseline (the tap was there before the agent)
    vm_sends(fd, 10)
    assert vm_tx_by_type(agent.poll_once()) == {pb.PUBLIC: 10 * FRAME}
    vm_sends(fd, 5)  # on cloudbr0
    release = threading.Event()
    if one_read:
        held(agent, host, release)
    try:
        # (down while renamed: kernels before 6.x refuse to rename a link that is up)
        ip("-n", host, "link", "set", "vnet0", "down")
        ip("-n", host, "link", "set", "vnet0", "name", "tap-x")
        ip("-n", host, "link", "set", "tap-x", "up")
        if not one_read:
            told(agent, "rename")
        ip("-n", host, "link", "set", "tap-x", "master", "brvx-1001")
    finally:
        release.set()
    wait_until(lambda: agent.topology.placement("tap-x").bridge == "brvx-1001")
    told(agent, "move")
    vm_sends(fd, 7)  # on brvx-1001
    assert vm_tx_by_type(agent.poll_once()) == {pb.PUBLIC: 5 * FRAME, pb.GUEST: 7 * FRAME}
    vm_sends(fd, 3)
    assert vm_tx_by_type(agent.poll_once()) == {pb.GUEST: 3 * FRAME}


def test_a_move_whose_message_an_overrun_lost_bills_its_bytes_until_the_redump_to_the_bridge_it_left(
    tmp_path: Path,
    host: str,  # noqa: F811
) -> None:
    """A VM's tap moves from cloudbr0 (public) to brvx-1001 (guest) while the event socket
    overruns (a burst of new taps, the topology's thread held): the move's own message is lost
    and the agent learns of the move from the re-dump. The dump's counters of the tap split its
    bytes: up to the dump as the bridge it left (here exactly its bytes before the move: the
    VM sent none between the move and the dump), after it guest. The re-dump told no move: the
    agent typed the whole poll as guest (the public bytes lost from the bill)."""
    with running_agent(tmp_path, host, rcvbuf=4096) as (agent, fd):
        agent.poll_once()  # the baseline
        vm_sends(fd, 10)
        assert vm_tx_by_type(agent.poll_once()) == {pb.PUBLIC: 10 * FRAME}
        vm_sends(fd, 5)  # on cloudbr0
        release = threading.Event()
        try:
            held(agent, host, release)
            burst = "".join(f"tuntap add dev burst{i} mode tap\n" for i in range(20))
            subprocess.run(["ip", "-n", host, "-batch", "-"], input=burst, text=True, check=True)
            ip("-n", host, "link", "set", "vnet0", "master", "brvx-1001")  # its message lost
        finally:
            release.set()
        wait_until(lambda: agent.topology.placement("vnet0").bridge == "brvx-1001")
        assert agent.topology.overruns >= 1
        told(agent, "move")
        vm_sends(fd, 7)  # on brvx-1001
        assert vm_tx_by_type(agent.poll_once()) == {pb.PUBLIC: 5 * FRAME, pb.GUEST: 7 * FRAME}
        vm_sends(fd, 3)
        assert vm_tx_by_type(agent.poll_once()) == {pb.GUEST: 3 * FRAME}
