"""A running VM's tap moved from one bridge to another between two polls (CloudStack's
BridgeVifDriver.detach, then attach: `ip link set vnetN nomaster`, then `master <new bridge>`),
in a real network namespace: real bridges, a real VXLAN uplink, a real tap held open as QEMU
holds it, the agent's real topology (netlink events) and counter table, its traffic rules from a
TOML file."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from kvmeter.agent.config import load
from kvmeter.agent.daemon import Agent
from kvmeter.agent.linkevents import LinkEventSocket
from kvmeter.agent.model import DomainInfo, NicInfo
from kvmeter.agent.spool import Spool
from kvmeter.agent.topology import Topology
from kvmeter.proto import pb
from tests.integration.test_topology_netns import (
    FRAME,
    frame,
    host,  # noqa: F401  (the fixture: cloud0, cloudbr0, brvx-1001 over vxlan1001)
    inside,
    ip,
    made_in,
    vm_tap,
    wait_until,
)
from tests.unit.test_agent_daemon import FakeInventory

pytestmark = pytest.mark.netns

TAP_MAC = "fe:00:00:00:00:01"  # libvirt gives the tap the NIC's MAC with 0xfe first
NIC_MAC = "02:00:00:00:00:01"


def proc_net_dev(netns: str) -> bytes:
    """/proc/net/dev of the namespace, as the agent reads it on a host."""
    with inside(netns):
        with open("/proc/thread-self/net/dev", "rb") as f:
            return f.read()


def vm_sends(fd: int, count: int) -> None:
    """The VM transmits `count` frames on its NIC (host rx of its tap: the VM's tx)."""
    for seq in range(count):
        os.write(fd, frame(seq))


def agent_over(
    tmp_path: Path,
    host: str,  # noqa: F811
    nic: NicInfo,
    uuid: str,
    read_mac: dict[str, str],
    rcvbuf: int = 4 << 20,
) -> Agent:
    """An agent (not started) over the namespace, its traffic rules from a TOML file (VNI 1001
    guest, the defaults otherwise), one running VM with `nic`; `read_mac`: the taps' MACs by name.
    `rcvbuf`: the event socket's buffer (a small one overruns)."""
    config = tmp_path / "agent.toml"
    config.write_text(
        '[agent]\nhost_id = "h1"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        "[traffic]\ndefaults = true\n"
        '[[traffic.rules]]\nvni = "1001"\ntype = "guest"\n'
    )
    settings = load(config)
    topology = Topology(
        settings.traffic,
        ipr_factory=made_in(host, IPRoute),
        event_socket_factory=made_in(host, lambda: LinkEventSocket(rcvbuf=rcvbuf)),
    )
    domain = DomainInfo(uuid=uuid, name=f"i-2-{uuid[2:]}-VM", state="running", kind="user_vm", nics=(nic,))
    return Agent(
        settings,
        inventory=FakeInventory((domain,)),
        topology=topology,
        spool=Spool(tmp_path / "spool"),
        boot_id="boot-1",
        read_text=lambda: proc_net_dev(host),
        sources=(),
        read_mac=read_mac.get,
    )


@contextmanager
def running_agent(tmp_path: Path, host: str, rcvbuf: int = 4 << 20) -> Iterator[tuple[Agent, int]]:  # noqa: F811
    """An agent over the namespace, one VM whose tap vnet0 starts on cloudbr0 (public); libvirt's
    XML says vnet0 whatever the tap is called later (its NIC is then found by the tap's MAC).
    `rcvbuf`: the event socket's buffer (a small one overruns)."""
    with vm_tap(host, "vnet0") as fd:
        ip("-n", host, "link", "set", "vnet0", "address", TAP_MAC)
        ip("-n", host, "link", "set", "vnet0", "master", "cloudbr0")
        ip("-n", host, "link", "set", "vnet0", "up")
        nic = NicInfo(mac=NIC_MAC, device="vnet0", nic_type="bridge", bridge="cloudbr0")
        agent = agent_over(tmp_path, host, nic, "u-1", {"vnet0": TAP_MAC, "tap-x": TAP_MAC}, rcvbuf)
        agent.start()
        try:
            yield agent, fd
        finally:
            agent.close()


@pytest.fixture
def agent_on(tmp_path: Path, host: str) -> Iterator[tuple[Agent, int]]:  # noqa: F811
    with running_agent(tmp_path, host) as running:
        yield running


def told(agent: Agent, kind: str, timeout: float = 1.0) -> None:
    """Until the topology's thread has handed the agent a link event of `kind` (it does so just
    after the link map shows it), or `timeout`: code that sends none is checked by its bytes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if agent.metrics.registry.get_sample_value("kvmeter_agent_link_events_total", {"kind": kind}):
            return
        time.sleep(0.01)


def vm_tx_by_type(batch: pb.MeasureBatch) -> dict[int, int]:
    totals: dict[int, int] = {}
    for m in batch.measures:
        if m.direction == pb.VM_TX:
            totals[m.traffic_type] = totals.get(m.traffic_type, 0) + m.bytes
    return totals


@pytest.mark.parametrize("detached_first", [True, False], ids=["nomaster-then-master", "master"])
def test_a_tap_moved_to_another_bridge_bills_its_bytes_before_the_move_to_the_bridge_it_left(
    agent_on: tuple[Agent, int],
    host: str,  # noqa: F811
    detached_first: bool,
) -> None:
    """A VM's tap moves from cloudbr0 (public) to brvx-1001 (guest, VNI 1001) between two polls:
    the bytes it moved on cloudbr0 since the last poll are public and only those after the move
    guest. The kernel's RTM_NEWLINK for the move carries the tap's counters at that moment; the
    agent typed the whole poll's bytes by where the tap sat at the poll (public bytes billed as
    guest, and the billable public traffic lost from the bill). Whether the tap is detached first
    (BridgeVifDriver.detach, then attach) or moved by one `ip link set master`."""
    agent, fd = agent_on
    agent.poll_once()  # the baseline (the tap was there before the agent)
    vm_sends(fd, 10)
    assert vm_tx_by_type(agent.poll_once()) == {pb.PUBLIC: 10 * FRAME}
    vm_sends(fd, 5)  # on cloudbr0
    if detached_first:  # BridgeVifDriver.detach, then attach
        ip("-n", host, "link", "set", "vnet0", "nomaster")
    ip("-n", host, "link", "set", "vnet0", "master", "brvx-1001")
    wait_until(lambda: agent.topology.placement("vnet0").bridge == "brvx-1001")
    told(agent, "move")
    vm_sends(fd, 7)  # on brvx-1001
    assert vm_tx_by_type(agent.poll_once()) == {pb.PUBLIC: 5 * FRAME, pb.GUEST: 7 * FRAME}
    vm_sends(fd, 3)
    assert vm_tx_by_type(agent.poll_once()) == {pb.GUEST: 3 * FRAME}


def moves(agent: Agent) -> float:
    """How many "move" link events the topology's thread has handed the agent."""
    return agent.metrics.registry.get_sample_value("kvmeter_agent_link_events_total", {"kind": "move"}) or 0


def test_a_tap_moved_twice_between_two_polls_bills_each_stretch_as_the_bridge_it_was_on(
    agent_on: tuple[Agent, int],
    host: str,  # noqa: F811
) -> None:
    """A VM's tap goes from cloudbr0 (public) to brvx-1001 (guest, VNI 1001) and back to
    cloudbr0 between two polls: the bytes before the first move are public, those on brvx-1001
    guest, those after the second move public again. Each move's kernel message carries the
    tap's counters; the agent typed both stretches before a move by where the last poll saw the
    tap (cloudbr0): the guest bytes were billed as public."""
    agent, fd = agent_on
    agent.poll_once()  # the baseline
    vm_sends(fd, 10)
    assert vm_tx_by_type(agent.poll_once()) == {pb.PUBLIC: 10 * FRAME}
    vm_sends(fd, 5)  # on cloudbr0
    ip("-n", host, "link", "set", "vnet0", "master", "brvx-1001")
    wait_until(lambda: agent.topology.placement("vnet0").bridge == "brvx-1001")
    wait_until(lambda: moves(agent) == 1)
    vm_sends(fd, 7)  # on brvx-1001
    ip("-n", host, "link", "set", "vnet0", "master", "cloudbr0")
    wait_until(lambda: agent.topology.placement("vnet0").bridge == "cloudbr0")
    wait_until(lambda: moves(agent) == 2)  # both handed over to the agent
    vm_sends(fd, 4)  # on cloudbr0 again
    assert vm_tx_by_type(agent.poll_once()) == {pb.PUBLIC: 9 * FRAME, pb.GUEST: 7 * FRAME}
