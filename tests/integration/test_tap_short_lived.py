"""A tap made and deleted between two polls with no successor under its name (a VM started and
stopped, within one poll interval), on the real kernel: a real bridge and tap in a network
namespace, the agent's real topology and counter table, its traffic rules from a TOML file, and
its real inventory following libvirt's test driver by its domain events. By the poll the domain
is gone: only what the inventory knew while the tap lived can name the NIC its bytes are."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from pyroute2 import IPRoute

from kvmeter.agent.config import load
from kvmeter.agent.daemon import Agent
from kvmeter.agent.inventory import Inventory
from kvmeter.agent.linkevents import LinkEventSocket
from kvmeter.agent.spool import Spool
from kvmeter.agent.topology import Topology
from kvmeter.proto import pb
from tests.harness.libvirt_node import Domain, Nic, domain_xml, tap_mac
from tests.integration.test_tap_move_edges import proc_net_dev, vm_sends
from tests.integration.test_topology_netns import (
    FRAME,
    host,  # noqa: F401  (the fixture: cloud0, cloudbr0, brvx-1001 over vxlan1001)
    ip,
    made_in,
    vm_tap,
    wait_until,
)

pytestmark = [pytest.mark.netns, pytest.mark.libvirt]

NIC_MAC = "02:00:46:00:00:01"
OTHER_MAC = "02:00:47:00:00:01"  # another VM's NIC, never seen by the inventory
BRIEF_VM = Domain(
    name="i-2-70-VM",
    uuid="6f1c6c4e-0000-4000-8000-000000000070",
    nics=(Nic(mac=NIC_MAC, bridge="cloudbr0", dev="kvtap70"),),
)
NEXT_VM = Domain(  # the VM that starts next, its NIC under the same name
    name="i-3-71-VM",
    uuid="6f1c6c4e-0000-4000-8000-000000000071",
    nics=(Nic(mac=OTHER_MAC, bridge="cloudbr0", dev="kvtap70"),),
)


@pytest.fixture
def driver() -> Iterator[libvirt.virConnect]:
    """A read-write connection to the process-wide test:///default driver (the VM gone after)."""
    conn = libvirt.open("test:///default")
    try:
        yield conn
    finally:
        for dom in conn.listAllDomains(0):
            if dom.name() in (BRIEF_VM.name, NEXT_VM.name) and dom.isActive():
                dom.destroy()
        conn.close()


@pytest.fixture
def agent(tmp_path: Path, host: str) -> Iterator[Agent]:  # noqa: F811
    """An agent over the namespace and libvirt's test driver, polled once before the VM starts."""
    config = tmp_path / "agent.toml"
    config.write_text(
        '[agent]\nhost_id = "h1"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        '[libvirt]\nuri = "test:///default"\n'
        "[traffic]\ndefaults = true\n"
    )
    settings = load(config)
    topology = Topology(
        settings.traffic,
        ipr_factory=made_in(host, IPRoute),
        event_socket_factory=made_in(host, LinkEventSocket),
    )
    running = Agent(
        settings,
        inventory=Inventory(settings.libvirt_uri, resync_seconds=3600),  # by events alone
        topology=topology,
        spool=Spool(tmp_path / "spool"),
        boot_id="boot-1",
        read_text=lambda: proc_net_dev(host),
        sources=(),
        read_mac=lambda _name: None,  # the link messages carry the MACs
    )
    running.start()
    try:
        running.poll_once()
        yield running
    finally:
        running.close()


def brief_tap(host: str, mac: str, frames: int) -> None:  # noqa: F811
    """A tap kvtap70 with `mac` on cloudbr0 that carries `frames` of the VM's and is deleted."""
    with vm_tap(host, "kvtap70") as fd:
        ip("-n", host, "link", "set", "kvtap70", "address", mac)
        ip("-n", host, "link", "set", "kvtap70", "master", "cloudbr0")
        ip("-n", host, "link", "set", "kvtap70", "up")
        vm_sends(fd, frames)


def deletions_told(agent: Agent, count: int) -> None:
    """Until the topology's thread has handed the agent `count` link deletions."""
    events = agent.metrics.registry.get_sample_value
    wait_until(lambda: (events("kvmeter_agent_link_events_total", {"kind": "del"}) or 0) >= count)


def vm_tx_by_mac(batch: pb.MeasureBatch) -> dict[str, int]:
    totals: dict[str, int] = {}
    for m in batch.measures:
        if m.direction == pb.VM_TX:
            totals[m.mac] = totals.get(m.mac, 0) + m.bytes
    return totals


def test_a_vm_started_and_stopped_between_two_polls_is_billed_its_taps_bytes(
    agent: Agent,
    host: str,  # noqa: F811
    driver: libvirt.virConnect,
) -> None:
    """A transient VM starts after the agent's last poll (the inventory reads it running, its
    NIC naming kvtap70), sends 5 frames and stops before the next poll: its tap's final
    counters, in the kernel's RTM_DELLINK, are billed to its NIC. Before, at the poll no running
    domain named kvtap70, so those bytes went out as "not a VM NIC": counted, never billed."""
    dom = driver.createXML(domain_xml(BRIEF_VM), 0)
    wait_until(lambda: "kvtap70" in agent.inventory.by_device())  # type: ignore[attr-defined]
    brief_tap(host, tap_mac(NIC_MAC), 5)
    deletions_told(agent, 1)
    dom.destroy()
    wait_until(lambda: BRIEF_VM.uuid not in agent.inventory.snapshot())
    assert vm_tx_by_mac(agent.poll_once()) == {NIC_MAC: 5 * FRAME}


def test_another_vms_tap_under_the_name_is_not_billed_to_the_vm_that_had_it(
    agent: Agent,
    host: str,  # noqa: F811
    driver: libvirt.virConnect,
) -> None:
    """The VM's tap kvtap70 comes and goes (5 frames), then, before the next poll, another VM's
    tap, whose NIC the inventory never saw, is made and deleted under the same name (7 frames):
    the first tap's bytes are the VM's, the second's are nobody's (its MAC is not the NIC's),
    never the first VM's."""
    dom = driver.createXML(domain_xml(BRIEF_VM), 0)
    wait_until(lambda: "kvtap70" in agent.inventory.by_device())  # type: ignore[attr-defined]
    brief_tap(host, tap_mac(NIC_MAC), 5)
    dom.destroy()
    wait_until(lambda: BRIEF_VM.uuid not in agent.inventory.snapshot())
    brief_tap(host, tap_mac(OTHER_MAC), 7)
    deletions_told(agent, 2)
    assert vm_tx_by_mac(agent.poll_once()) == {NIC_MAC: 5 * FRAME}


def test_a_vm_gone_between_two_polls_is_billed_its_bytes_not_the_vm_that_took_its_taps_name(
    agent: Agent,
    host: str,  # noqa: F811
    driver: libvirt.virConnect,
) -> None:
    """The VM's tap kvtap70 comes and goes (5 frames) and the VM stops; before the next poll
    another VM starts whose NIC names kvtap70 (libvirt reuses the name) and sends 7 frames on
    its own tap: 5 frames are the first VM's, 7 the second's. Before, the deleted tap took the
    NIC now under its name, whatever its MAC: the second VM's tenant was billed the first's."""
    dom = driver.createXML(domain_xml(BRIEF_VM), 0)
    wait_until(lambda: "kvtap70" in agent.inventory.by_device())  # type: ignore[attr-defined]
    brief_tap(host, tap_mac(NIC_MAC), 5)
    dom.destroy()
    wait_until(lambda: BRIEF_VM.uuid not in agent.inventory.snapshot())
    driver.createXML(domain_xml(NEXT_VM), 0)
    wait_until(lambda: NEXT_VM.uuid in agent.inventory.snapshot())
    with vm_tap(host, "kvtap70") as fd:
        ip("-n", host, "link", "set", "kvtap70", "address", tap_mac(OTHER_MAC))
        ip("-n", host, "link", "set", "kvtap70", "master", "cloudbr0")
        ip("-n", host, "link", "set", "kvtap70", "up")
        vm_sends(fd, 7)
        deletions_told(agent, 1)
        assert vm_tx_by_mac(agent.poll_once()) == {NIC_MAC: 5 * FRAME, OTHER_MAC: 7 * FRAME}


def test_a_tap_gone_before_the_inventory_hears_its_vm_stop_is_billed_to_its_nic(
    agent: Agent,
    host: str,  # noqa: F811
    driver: libvirt.virConnect,
) -> None:
    """A VM starts after the agent's last poll (the inventory reads it running, its NIC naming
    kvtap70), sends 5 frames, and its tap is deleted; the poll comes before the inventory has
    heard the VM stop (the tap goes as QEMU exits, libvirt's event comes after its cleanup, the
    inventory's worker reads it later still: here the domain is simply still running). The
    tap's final counters carry its NIC's MAC, and the inventory still shows that NIC running
    under its name: they are its bytes. Before, the deleted tap had no link at the poll (so no
    owner in the plan) and no "left" owner yet: counted, never billed."""
    driver.createXML(domain_xml(BRIEF_VM), 0)
    wait_until(lambda: "kvtap70" in agent.inventory.by_device())  # type: ignore[attr-defined]
    brief_tap(host, tap_mac(NIC_MAC), 5)
    deletions_told(agent, 1)
    assert vm_tx_by_mac(agent.poll_once()) == {NIC_MAC: 5 * FRAME}


UNSEEN_MAC = "02:00:48:00:00:01"  # a VM's NIC whose whole run the inventory never saw


def test_an_unseen_vms_tap_under_the_name_is_not_billed_to_the_vm_that_took_it(
    agent: Agent,
    host: str,  # noqa: F811
    driver: libvirt.virConnect,
) -> None:
    """A libvirt tap kvtap70 (MAC fe: + another VM's NIC, a VM whose start and stop the
    inventory never saw: drained together, or its worker reconnecting) carries 5 frames and is
    deleted; before the next poll another VM starts whose NIC takes the name kvtap70 and sends
    7 frames on its own tap. The first tap's bytes are nobody's (counted, "not a VM NIC"), not
    the second VM's: its MAC is a libvirt tap's (0xfe first) that is not that NIC's. Before,
    a deleted tap whose MAC was not the NIC's now under its name went to that NIC whenever the
    inventory had not seen its own: the second VM's tenant was billed 12 frames."""
    brief_tap(host, tap_mac(UNSEEN_MAC), 5)
    deletions_told(agent, 1)
    driver.createXML(domain_xml(NEXT_VM), 0)
    wait_until(lambda: NEXT_VM.uuid in agent.inventory.snapshot())
    with vm_tap(host, "kvtap70") as fd:
        ip("-n", host, "link", "set", "kvtap70", "address", tap_mac(OTHER_MAC))
        ip("-n", host, "link", "set", "kvtap70", "master", "cloudbr0")
        ip("-n", host, "link", "set", "kvtap70", "up")
        vm_sends(fd, 7)
        events = agent.metrics.registry.get_sample_value
        wait_until(lambda: (events("kvmeter_agent_link_events_total", {"kind": "new"}) or 0) >= 2)
        assert vm_tx_by_mac(agent.poll_once()) == {OTHER_MAC: 7 * FRAME}
