"""Whose bytes, which way and of which traffic type, at the edges of a host's NICs: a macvtap
whatever libvirt calls it, a macvtap on an untagged device, an Open vSwitch port, a tap that
outlives its VM and is given to another, a tap an operator renames. An agent over a scripted
host whose links go through a real LinkTable (placements, events), as the topology's do."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kvmeter.agent.daemon import Agent
from kvmeter.agent.linktable import RTM_DELLINK, RTM_NEWLINK, LinkRecord, LinkTable
from kvmeter.agent.model import DomainInfo, NicInfo
from kvmeter.agent.spool import Spool
from kvmeter.agent.traffic import TrafficRules
from kvmeter.proto import pb
from tests.unit.test_agent_daemon import Clock, FakeInventory, ProcNetDev, agent_config
from tests.unit.test_poll_plan import WorldTopology


class Host(ProcNetDev):
    """The kernel as the agent sees it: links through a real LinkTable, whose events reach the
    agent, and their host-side counters (rx_bytes, rx_packets, tx_bytes, tx_packets) as
    /proc/net/dev text."""

    def __init__(self, *links: LinkRecord) -> None:
        super().__init__()
        self.table = LinkTable(TrafficRules([]))
        self.listeners: list[Callable[[Any], None]] = []
        for record in (LinkRecord(1, "lo"), *links):
            self.add(record)

    def add(self, record: LinkRecord) -> None:
        self.counters.setdefault(record.ifname, [0, 0, 0, 0])
        self._tell(self.table.apply(RTM_NEWLINK, record))

    def delete(self, name: str) -> None:
        record = self.table.record(name)
        assert record is not None
        c = self.counters.pop(name)
        self._tell(
            self.table.apply(RTM_DELLINK, LinkRecord(record.ifindex, name, stats=(c[0], c[1], c[2], c[3])))
        )

    def rename(self, old: str, new: str) -> None:
        """`ip link set OLD name NEW`: the same link (ifindex, counters) under a new name; the
        kernel's RTM_NEWLINK carries its counters."""
        record = self.table.record(old)
        assert record is not None
        c = self.counters[new] = self.counters.pop(old)
        renamed = LinkRecord(
            record.ifindex, new, record.kind, record.master, record.link, stats=(c[0], c[1], c[2], c[3])
        )
        self._tell(self.table.apply(RTM_NEWLINK, renamed))

    def _tell(self, event: Any) -> None:
        if event is not None:
            for callback in self.listeners:
                callback(event)


def vm(uuid: str, *nics: NicInfo) -> DomainInfo:
    return DomainInfo(uuid=uuid, name=f"i-2-{uuid}-VM", state="running", kind="user_vm", nics=nics)


def make_agent(
    host: Host, inventory: FakeInventory, spool_dir: Path, clock: Clock, rules: Any = (), **parts: Any
) -> Agent:
    config = agent_config({"agent": {"host_id": "h1"}, "traffic": {"rules": list(rules)}})
    host.table.rules = config.traffic
    agent = Agent(
        config,
        inventory=inventory,
        topology=WorldTopology(host),  # type: ignore[arg-type]  # a World's table and listeners
        spool=Spool(spool_dir),
        boot_id="boot-1",
        read_text=host.text,
        wall=clock,
        mono=clock,
        **parts,
    )
    agent.start()
    return agent


def billed(spool_dir: Path) -> dict[tuple[str, int], int]:
    """(instance uuid, direction) -> bytes over every spooled batch (each (stream, seq) once)."""
    spool = Spool(spool_dir, read_only=True)
    seen = set()
    totals: dict[tuple[str, int], int] = {}
    for frame in spool.pending():
        if (frame.stream_id, frame.seq) not in seen:
            seen.add((frame.stream_id, frame.seq))
            for m in pb.MeasureBatch.FromString(spool.read_batch(frame)).measures:
                totals[m.instance_uuid, m.direction] = totals.get((m.instance_uuid, m.direction), 0) + m.bytes
    return totals


def polled(agent: Agent, clock: Clock, device: str) -> list[pb.IPMeasure]:
    """One poll 10 s after the last: its measures of `device`."""
    clock.t += 10
    return [m for m in agent.poll_once().measures if m.device == device]


@pytest.mark.parametrize("nic_type", ["direct", "ethernet"])
def test_a_macvtap_is_never_swapped_whatever_libvirt_calls_the_nic(tmp_path: Path, nic_type: str) -> None:
    """A macvtap is the guest's end (its rx is what the guest received): libvirt's 'direct',
    and 'ethernet' on a pre-created macvtap (<target dev='mvt0' managed='no'/>) alike."""
    host = Host(LinkRecord(2, "eth1"), LinkRecord(10, "mvt0", "macvtap", link=2))
    nic = NicInfo(mac="52:54:00:00:00:0c", device="mvt0", nic_type=nic_type)
    clock = Clock()
    agent = make_agent(host, FakeInventory((vm("u-c", nic),)), tmp_path, clock)
    agent.poll_once()
    host.traffic("mvt0", 5000, 7)
    measures = polled(agent, clock, "mvt0")
    agent.close()
    assert {m.direction: m.bytes for m in measures} == {pb.VM_RX: 5000, pb.VM_TX: 7}


def test_a_macvtap_on_an_untagged_device_is_classified_by_that_device(tmp_path: Path) -> None:
    """CloudStack's DirectVifDriver puts a NIC on eth1 itself (<source dev='eth1'/>): no bridge,
    no VLAN, so the device a macvtap hangs off is what a rule's `bridge` names (it was billed
    as "unknown", under no traffic type)."""
    host = Host(LinkRecord(2, "eth1"), LinkRecord(10, "macvtap0", "macvtap", link=2))
    nic = NicInfo(mac="52:54:00:00:00:0d", device="macvtap0", nic_type="direct", source_dev="eth1")
    clock = Clock()
    rules = [{"bridge": "eth1", "type": "public"}]
    agent = make_agent(host, FakeInventory((vm("u-d", nic),)), tmp_path, clock, rules)
    agent.poll_once()
    host.traffic("macvtap0", 100, 200)
    measures = polled(agent, clock, "macvtap0")
    agent.close()
    assert {(m.traffic_type, m.bridge, m.bytes) for m in measures} == {
        (pb.PUBLIC, "eth1", 100),
        (pb.PUBLIC, "eth1", 200),
    }


def test_an_open_vswitch_port_is_classified_by_its_nics_bridge_and_vlan_tag(tmp_path: Path) -> None:
    """On Open vSwitch a tap's kernel master is the datapath (ovs-system), whichever OVS bridge
    and VLAN tag the port has: libvirt's XML says those (<source bridge='br-int'/>,
    <vlan><tag id='204'/></vlan>), and the traffic rules classify by them (it was "unknown")."""
    host = Host(
        LinkRecord(3, "ovs-system", "openvswitch"),
        LinkRecord(4, "br-int", "openvswitch", master=3),
        LinkRecord(5, "vxlan_sys_4789", "vxlan", master=3),  # OVS's flow-based tunnel port
        LinkRecord(10, "vnet8", "tun", master=3),
    )
    nic = NicInfo(mac="52:54:00:aa:bb:05", device="vnet8", nic_type="bridge", bridge="br-int", vlan_tag=204)
    clock = Clock()
    agent = make_agent(
        host, FakeInventory((vm("u-o", nic),)), tmp_path, clock, [{"vlan": "204", "type": "guest"}]
    )
    first = agent.poll_once()
    host.traffic("vnet8", 100, 200)
    measures = polled(agent, clock, "vnet8")
    agent.set_traffic_rules(TrafficRules.from_config({"rules": [{"vlan": "204", "type": "public"}]}))
    host.traffic("vnet8", 100, 200)
    reloaded = polled(agent, clock, "vnet8")
    agent.close()
    assert {(m.traffic_type, m.vlan_id, m.bridge) for m in measures} == {(pb.GUEST, 204, "br-int")}
    (record,) = first.inventory  # the collector's inventory says the same
    assert (record.nics[0].traffic_type, record.nics[0].vlan_id) == (pb.GUEST, 204)
    assert {m.traffic_type for m in reloaded} == {pb.PUBLIC}  # classified again by new rules


def test_a_renamed_tap_goes_on_counting_and_is_not_billed_again_from_zero(tmp_path: Path) -> None:
    """An operator renames a VM's tap (`ip link set vnet0 name tap-x`: the same ifindex and
    counters; libvirt's XML still says vnet0, so the NIC is found by its tap's MAC): its bytes go
    on from where they were (its whole count was billed a second time), those since the last
    poll included."""
    host = Host(LinkRecord(3, "cloudbr0", "bridge"))
    nic = NicInfo(mac="02:00:00:00:00:01", device="vnet0", nic_type="bridge", bridge="cloudbr0")
    macs = {"vnet0": "fe:00:00:00:00:01", "tap-x": "fe:00:00:00:00:01"}
    clock = Clock()
    agent = make_agent(host, FakeInventory((vm("u-1", nic),)), tmp_path, clock, read_mac=macs.get)
    agent.poll_once()
    host.add(LinkRecord(20, "vnet0", "tun", master=3))  # the VM's tap, made while the agent runs
    host.traffic("vnet0", 1_000_000, 2_000_000)
    clock.t += 10
    agent.poll_once()
    host.traffic("vnet0", 10, 20)
    clock.t += 10
    agent.poll_once()  # a steady poll: the counter is in the engine's columns
    host.traffic("vnet0", 1, 2)
    host.rename("vnet0", "tap-x")
    host.traffic("tap-x", 3, 4)
    for _ in range(2):
        clock.t += 10
        agent.poll_once()
    agent.close()
    got = billed(tmp_path)
    assert (got[("u-1", pb.VM_TX)], got[("u-1", pb.VM_RX)]) == (1_000_014, 2_000_026)


def test_a_tap_that_outlives_its_vm_bills_that_vms_last_bytes_to_it_not_to_the_next(tmp_path: Path) -> None:
    """A pre-created tap (type='ethernet' managed='no') stays when its VM stops; another VM
    then takes it. The bytes since the last poll when the first VM left are its own: the poll
    that first sees it gone reads them under it (they went to the next VM)."""
    host = Host(LinkRecord(10, "tap-custom", "tun"))  # made by the operator before the agent
    a = vm("u-a", NicInfo(mac="52:54:00:00:00:0a", device="tap-custom", nic_type="ethernet"))
    b = vm("u-b", NicInfo(mac="52:54:00:00:00:0b", device="tap-custom", nic_type="ethernet"))
    inventory = FakeInventory((a,))
    clock = Clock()
    agent = make_agent(host, inventory, tmp_path, clock)
    agent.poll_once()  # the baseline
    host.traffic("tap-custom", 100, 200)
    clock.t += 10
    agent.poll_once()
    host.traffic("tap-custom", 30, 40)  # A's last bytes, then A stops: the tap stays
    inventory.domains = ()
    clock.t += 10
    agent.poll_once()
    inventory.domains = (b,)
    host.traffic("tap-custom", 1000, 2000)
    for _ in range(2):
        clock.t += 10
        agent.poll_once()
    agent.close()
    got = billed(tmp_path)
    # host rx is what the VM sent (VM_TX), host tx what it received (VM_RX)
    assert (got[("u-a", pb.VM_TX)], got[("u-a", pb.VM_RX)]) == (130, 240)
    assert (got[("u-b", pb.VM_TX)], got[("u-b", pb.VM_RX)]) == (1000, 2000)


def test_a_tap_given_to_another_vm_between_two_polls_bills_that_poll_to_the_vm_it_had(tmp_path: Path) -> None:
    """The poll that first sees a tap's NIC changed (another VM's, the link the same) reads it
    under the NIC it had, by the same rule: no reading can split the bytes of a poll in which
    one VM left and the next came. The new NIC counts from that reading (by columns again)."""
    host = Host(LinkRecord(10, "tap-custom", "tun"))
    a = vm("u-a", NicInfo(mac="52:54:00:00:00:0a", device="tap-custom", nic_type="ethernet"))
    b = vm("u-b", NicInfo(mac="52:54:00:00:00:0b", device="tap-custom", nic_type="ethernet"))
    inventory = FakeInventory((a,))
    clock = Clock()
    agent = make_agent(host, inventory, tmp_path, clock)
    agent.poll_once()
    host.traffic("tap-custom", 30, 40)  # A's, then A leaves and B takes the tap
    inventory.domains = (b,)
    clock.t += 10
    agent.poll_once()
    for _ in range(3):
        host.traffic("tap-custom", 1000, 2000)
        clock.t += 10
        agent.poll_once()
    agent.close()
    got = billed(tmp_path)
    assert (got[("u-a", pb.VM_TX)], got[("u-a", pb.VM_RX)]) == (30, 40)
    assert (got[("u-b", pb.VM_TX)], got[("u-b", pb.VM_RX)]) == (3000, 6000)


@pytest.mark.parametrize("back", ["the same VM", "its NIC"])
def test_a_hand_over_undone_before_its_poll_is_spooled_leaves_the_tap_to_its_vm(
    tmp_path: Path, back: str
) -> None:
    """A tap's VM leaves (or its NIC goes to another VM), the poll that would hand it over cannot
    be spooled, and the VM has it again by the next poll: nothing was handed over, every byte is
    still that VM's."""
    host = Host(LinkRecord(10, "tap-custom", "tun"))
    a = vm("u-a", NicInfo(mac="52:54:00:00:00:0a", device="tap-custom", nic_type="ethernet"))
    b = vm("u-b", NicInfo(mac="52:54:00:00:00:0b", device="tap-custom", nic_type="ethernet"))
    inventory = FakeInventory((a,))
    clock = Clock()
    agent = make_agent(host, inventory, tmp_path, clock)
    agent.poll_once()
    host.traffic("tap-custom", 30, 40)
    inventory.domains = () if back == "the same VM" else (b,)
    spool = agent.spool.append_poll

    def disk_full(*args: Any, **kwargs: Any) -> Any:
        raise OSError("disk full")

    agent.spool.append_poll = disk_full  # type: ignore[method-assign]
    clock.t += 10
    with pytest.raises(OSError, match="disk full"):
        agent.poll_once()
    agent.spool.append_poll = spool  # type: ignore[method-assign]
    inventory.domains = (a,)  # the same objects as before
    for _ in range(3):
        clock.t += 10
        agent.poll_once()
        host.traffic("tap-custom", 1000, 2000)
    agent.close()
    got = billed(tmp_path)
    assert got == {("u-a", pb.VM_TX): 2030, ("u-a", pb.VM_RX): 4040}


def test_a_tap_deleted_after_its_vm_left_bills_its_tail_to_that_vm(tmp_path: Path) -> None:
    """A VM leaves the inventory before its tap goes (its XML unreadable for a while, say): the
    poll that sees it gone reads the tap under it, and the tap's final counters, when it is
    deleted before any NIC has it again, are that VM's too."""
    host = Host(LinkRecord(10, "tap-custom", "tun"))
    a = vm("u-a", NicInfo(mac="52:54:00:00:00:0a", device="tap-custom", nic_type="ethernet"))
    inventory = FakeInventory((a,))
    clock = Clock()
    agent = make_agent(host, inventory, tmp_path, clock)
    agent.poll_once()
    host.traffic("tap-custom", 30, 40)
    inventory.domains = ()
    clock.t += 10
    agent.poll_once()
    host.traffic("tap-custom", 5, 6)
    host.delete("tap-custom")
    clock.t += 10
    agent.poll_once()
    agent.close()
    assert billed(tmp_path) == {("u-a", pb.VM_TX): 35, ("u-a", pb.VM_RX): 46}
