"""A running VM's tap with several link messages between two polls, on the real kernel: real
bridges, a real VXLAN uplink, a real tap held open as QEMU holds it, the agent's real topology
and counter table, its traffic rules from a TOML file. Each message's counters bound the bytes
before it: the bytes between two messages of a tap are the place the first left it on, whether
the messages come in one read of the event socket or in several, and whatever the later one
does (a second move, a change in place, the tap's deletion)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import pytest

from kvmeter.agent.daemon import Agent
from kvmeter.proto import pb
from tests.integration.test_tap_move_edges import (
    agent_on,  # noqa: F401  (the fixture)
    told,
    vm_sends,
    vm_tx_by_type,
)
from tests.integration.test_tap_move_rename_redump import held
from tests.integration.test_topology_netns import (
    FRAME,
    host,  # noqa: F401  (the fixture: cloud0, cloudbr0, brvx-1001 over vxlan1001)
    ip,
    wait_until,
)

pytestmark = pytest.mark.netns


def news(agent: Agent) -> float:
    return agent.metrics.registry.get_sample_value("kvmeter_agent_link_events_total", {"kind": "new"}) or 0


@contextmanager
def one_read(agent: Agent, host: str) -> Iterator[None]:  # noqa: F811
    """What the block makes the kernel send comes in one read of the event socket (the
    topology's thread held meanwhile); on leaving, the agent has been handed all of it (a link
    made after the block is told after it)."""
    release = threading.Event()
    held(agent, host, release)
    try:
        yield
    finally:
        release.set()
    told_before = news(agent)
    ip("-n", host, "tuntap", "add", "dev", "mark0", "mode", "tap")
    wait_until(lambda: news(agent) > told_before)


def public_then(agent: Agent, fd: int) -> None:
    """The baseline, then a poll of 10 frames the VM sent on cloudbr0 (public), then 5 more."""
    agent.poll_once()  # the baseline (the tap was there before the agent)
    vm_sends(fd, 10)
    assert vm_tx_by_type(agent.poll_once()) == {pb.PUBLIC: 10 * FRAME}
    vm_sends(fd, 5)  # on cloudbr0


def test_a_tap_moved_away_and_back_in_one_read_bills_the_bytes_between_as_the_bridge_it_visited(
    agent_on: tuple[Agent, int],  # noqa: F811
    host: str,  # noqa: F811
) -> None:
    """A VM's tap goes from cloudbr0 (public) to brvx-1001 (guest, VNI 1001) and back, its
    messages in one read: the bytes on brvx-1001 are guest. Only the read's last message of
    the tap was decoded (on cloudbr0, as before): the table told no move at all and the guest
    bytes were billed as public."""
    agent, fd = agent_on
    public_then(agent, fd)
    with one_read(agent, host):
        ip("-n", host, "link", "set", "vnet0", "master", "brvx-1001")
        vm_sends(fd, 7)  # on brvx-1001
        ip("-n", host, "link", "set", "vnet0", "master", "cloudbr0")
    vm_sends(fd, 4)  # on cloudbr0 again
    assert vm_tx_by_type(agent.poll_once()) == {pb.PUBLIC: 9 * FRAME, pb.GUEST: 7 * FRAME}


@pytest.mark.parametrize(
    "change",
    [("mtu", "1400"), ("txqueuelen", "500"), ("down",)],
    ids=["mtu", "txqueuelen", "down"],
)
def test_a_tap_moved_then_changed_in_place_in_one_read_splits_its_bytes_at_the_move(
    agent_on: tuple[Agent, int],  # noqa: F811
    host: str,  # noqa: F811
    change: tuple[str, ...],
) -> None:
    """A VM's tap moves from cloudbr0 (public) to brvx-1001 (guest), then its MTU, queue length
    or state changes, the messages in one read: the bytes between the move and the change are
    guest. The move was split at the later message's counters (the move's own message
    superseded): those bytes were billed as public."""
    agent, fd = agent_on
    public_then(agent, fd)
    with one_read(agent, host):
        ip("-n", host, "link", "set", "vnet0", "master", "brvx-1001")
        vm_sends(fd, 7)  # on brvx-1001
        ip("-n", host, "link", "set", "vnet0", *change)
    ip("-n", host, "link", "set", "vnet0", "up")
    vm_sends(fd, 3)
    assert vm_tx_by_type(agent.poll_once()) == {pb.PUBLIC: 5 * FRAME, pb.GUEST: 10 * FRAME}


@pytest.mark.parametrize("in_one_read", [False, True], ids=["two-reads", "one-read"])
def test_a_tap_moved_then_deleted_between_two_polls_bills_its_last_bytes_as_the_bridge_it_went_to(
    agent_on: tuple[Agent, int],  # noqa: F811
    host: str,  # noqa: F811
    in_one_read: bool,
) -> None:
    """A VM's tap moves from cloudbr0 (public) to brvx-1001 (guest), then the VM stops (QEMU
    closes the tap: deleted) before the next poll: the bytes after the move are guest. Its
    deletion's final counters were typed by where the last poll saw it (public), the move
    split or not."""
    agent, fd = agent_on
    public_then(agent, fd)
    reads = one_read(agent, host) if in_one_read else nullcontext()
    with reads:
        ip("-n", host, "link", "set", "vnet0", "master", "brvx-1001")
        if not in_one_read:
            told(agent, "move")
        vm_sends(fd, 7)  # on brvx-1001
        os.close(fd)  # the VM stops: its tap goes
    wait_until(lambda: agent.topology.ifindex("vnet0") is None)
    told(agent, "del")
    assert vm_tx_by_type(agent.poll_once()) == {pb.PUBLIC: 5 * FRAME, pb.GUEST: 7 * FRAME}
