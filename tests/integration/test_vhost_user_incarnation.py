"""A NIC without a host link (vhost-user, counted by libvirt's interfaceStats under its port name)
back under a new QEMU process within a few polls (a migration away and back, a stop and start,
another VM taking the freed name) counts from zero: libvirt's domain id tells the processes apart."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from kvmeter.agent.domxml import parse_domain_xml
from kvmeter.agent.linktable import LinkRecord
from kvmeter.agent.model import DomainInfo, NicInfo
from kvmeter.proto import pb
from tests.unit.fakes.libvirt_conn import xml_of
from tests.unit.test_agent_attribution_edges import Host, billed, make_agent, vm
from tests.unit.test_agent_daemon import Clock, FakeInventory

VHU = NicInfo(mac="02:00:3a:7b:00:01", device="csdpdk-1", nic_type="vhostuser")


def running(domain_id: int, uuid: str = "u-m") -> DomainInfo:
    """The VM under QEMU process `domain_id` (on a release whose DomainInfo has no domain id, the
    same VM without it: the test then shows the bytes that release bills)."""
    dom = vm(uuid, VHU)
    try:
        return replace(dom, domain_id=domain_id)
    except TypeError:
        return dom


@pytest.mark.parametrize("back", ["u-m", "u-other"])
def test_a_vhost_user_nic_back_on_its_host_within_a_few_polls_counts_from_zero(
    tmp_path: Path, back: str
) -> None:
    """A DPDK VM (vhost-user NIC, counted through libvirt: no ifindex, identity by name) is
    migrated away and back (or stopped and started) before the agent forgets its counter (3
    polls), or another VM migrates in and gets the freed port name (CloudStack names the next
    port csdpdk-<highest + 1>). The new QEMU counts from zero: everything it reports is new
    bytes, never a growth over the last incarnation's values (which left (40, 50) unbilled)."""
    host = Host(LinkRecord(2, "cloudbr0", "bridge"))
    first = running(7)
    inventory = FakeInventory((first,))
    inventory.stats["csdpdk-1"] = (0, 0, 0, 0)  # libvirt's view: the guest's rx, rx packets, tx, tx packets
    clock = Clock()
    agent = make_agent(host, inventory, tmp_path, clock)
    agent.poll_once()
    inventory.stats["csdpdk-1"] = (40, 1, 50, 1)
    clock.t += 10
    agent.poll_once()
    inventory.domains, inventory.stats = (), {}  # migrated away: its QEMU here ends
    clock.t += 10
    agent.poll_once()
    # back (a new QEMU, a new domain id, the same port name), its counters from zero
    inventory.domains = (running(12, back),)
    inventory.stats["csdpdk-1"] = (1000, 3, 2000, 4)
    for _ in range(2):
        clock.t += 10
        agent.poll_once()
    agent.close()
    got = billed(tmp_path)
    assert (got[("u-m", pb.VM_RX)], got[("u-m", pb.VM_TX)]) == ((1040, 2050) if back == "u-m" else (40, 50))
    assert (got[(back, pb.VM_RX)], got[(back, pb.VM_TX)]) == ((1040, 2050) if back == "u-m" else (1000, 2000))


def test_the_domain_id_is_read_from_a_running_domains_xml() -> None:
    """libvirt's live XML names the running QEMU's id (<domain id='3'>); an inactive one none."""
    assert parse_domain_xml(xml_of("i-2-10-VM")).domain_id == 3
    assert parse_domain_xml(xml_of("mixed-nics")).domain_id is None
