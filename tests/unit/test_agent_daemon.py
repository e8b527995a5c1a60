"""The poll loop with fake inventory/topology and a scripted counter table: exact totals across
steady polls, a VM reboot (tap deleted and recreated), a crash and restart, and a failed poll."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from kvmeter.agent.config import AgentConfig, validate
from kvmeter.agent.counters import CounterTable
from kvmeter.agent.daemon import Agent
from kvmeter.agent.linktable import LinkEvent
from kvmeter.agent.model import DomainInfo, LinkPlacement, NicInfo
from kvmeter.agent.spool import Spool
from kvmeter.proto import pb

BOOT = "boot-1"
NIC = NicInfo(mac="02:00:00:00:00:01", device="vnet0", nic_type="bridge", bridge="cloudbr0")
DOMAIN = DomainInfo(uuid="u-1", name="i-2-10-VM", state="running", kind="user_vm", nics=(NIC,))
HEADER = "Inter-|   Receive |  Transmit\n face |bytes packets|bytes packets\n"


class ProcNetDev:
    """Links' host-side counters (rx_bytes, rx_packets, tx_bytes, tx_packets), read as the
    kernel prints them in /proc/net/dev."""

    def __init__(self) -> None:
        self.counters: dict[str, list[int]] = {}

    def traffic(self, name: str, host_rx: int, host_tx: int) -> None:
        c = self.counters[name]
        c[0] += host_rx
        c[1] += 1
        c[2] += host_tx
        c[3] += 1

    def text(self) -> str:
        rows = [f"{n}: {c[0]} {c[1]} 0 0 0 0 0 0 {c[2]} {c[3]} 0 0 0 0 0 0" for n, c in self.counters.items()]
        return HEADER + "\n".join(rows) + "\n"


class Host(ProcNetDev):
    """The kernel as the agent sees it: links with counters, and their events."""

    def __init__(self) -> None:
        super().__init__()
        self.links: dict[str, int] = {"lo": 1, "vnet0": 10}
        self.counters = {"lo": [0, 0, 0, 0], "vnet0": [0, 0, 0, 0]}
        self.listeners: list[Callable[[Any], None]] = []
        self.next_ifindex = 11

    def delete(self, name: str) -> None:
        c = self.counters.pop(name)
        index = self.links.pop(name)
        for cb in self.listeners:
            cb(LinkEvent("del", name, index, (c[0], c[1], c[2], c[3])))

    def create(self, name: str) -> None:
        self.links[name] = self.next_ifindex
        self.next_ifindex += 1
        self.counters[name] = [0, 0, 0, 0]
        for cb in self.listeners:
            cb(LinkEvent("new", name, self.links[name], None))


class FakeTopology:
    def __init__(self, host: Host) -> None:
        self.host = host

    def start(self) -> None: ...
    def stop(self) -> None: ...

    def placement(self, ifname: str) -> LinkPlacement:
        return LinkPlacement(bridge="cloudbr0", traffic_type="public")

    def links(self) -> dict[str, int]:
        return dict(self.host.links)

    def add_listener(self, callback: Callable[[Any], None]) -> None:
        self.host.listeners.append(callback)

    def set_rules(self, rules: Any) -> None: ...


class FakeInventory:
    def __init__(self, domains: tuple[DomainInfo, ...] = (DOMAIN,)) -> None:
        self.domains = domains
        self.stats: dict[str, tuple[int, int, int, int]] = {}  # libvirt interfaceStats, guest view

    def start(self) -> None: ...
    def stop(self) -> None: ...

    def snapshot(self) -> dict[str, DomainInfo]:
        return {d.uuid: d for d in self.domains}

    def interface_stats(
        self, uuid: str, device: str, timeout: float = 2.0
    ) -> tuple[int, int, int, int] | None:
        return self.stats.get(device)


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


_CONFIGS: dict[str, AgentConfig] = {}


def agent_config(doc: dict[str, Any]) -> AgentConfig:
    """`validate(doc)`, once per distinct doc: each check runs a child interpreter (0.27 s), and
    the tests make hundreds of agents (the config is frozen, so sharing it is safe)."""
    key = json.dumps(doc, sort_keys=True)
    if key not in _CONFIGS:
        _CONFIGS[key] = validate(doc)
    return _CONFIGS[key]


def make_agent(
    host: Host,
    spool_dir: Path,
    clock: Clock,
    inventory: FakeInventory | None = None,
    settings: dict[str, Any] | None = None,
    **parts: Any,
) -> Agent:
    """An agent over the scripted host; `parts` replace its default parts (topology, read_mac)."""
    agent = Agent(
        agent_config({"agent": {"host_id": "h1"}, **(settings or {})}),
        **{
            "inventory": inventory or FakeInventory(),
            "topology": FakeTopology(host),
            "spool": Spool(spool_dir),
            "boot_id": BOOT,
            "read_text": host.text,
            "wall": clock,
            "mono": clock,
            **parts,
        },
    )
    agent.start()
    return agent


def vm_totals(spool_dir: Path) -> dict[int, int]:
    """VM-side bytes per direction over every spooled batch (each (stream, seq) once)."""
    spool = Spool(spool_dir, read_only=True)
    seen = set()
    totals = {pb.VM_RX: 0, pb.VM_TX: 0}
    for frame in spool.pending():
        if (frame.stream_id, frame.seq) in seen:
            continue
        seen.add((frame.stream_id, frame.seq))
        for m in pb.MeasureBatch.FromString(spool.read_batch(frame)).measures:
            totals[m.direction] += m.bytes
    return totals


@pytest.fixture
def host() -> Host:
    h = Host()
    h.traffic("vnet0", 5000, 7000)  # before the agent ran: baselined, never billed
    return h


def test_steady_traffic_counts_exactly_and_swaps_directions(host: Host, tmp_path: Path) -> None:
    clock = Clock()
    agent = make_agent(host, tmp_path, clock)
    agent.poll_once()
    for i in range(5):
        host.traffic("vnet0", 100 + i, 1000 * i)
        clock.t += 1
        agent.poll_once()
    agent.close()
    assert vm_totals(tmp_path) == {pb.VM_RX: 10_000, pb.VM_TX: 510}


@pytest.mark.parametrize("reboots", [1, 2])
def test_reboots_between_polls_count_every_tail_and_the_new_tap(
    host: Host, tmp_path: Path, reboots: int
) -> None:
    """With two, the middle incarnation is born and deleted between two polls: its "new" and
    "del" events come in one poll, the deletion after the birth (the agent hands events over
    together only up to an event on a key among them)."""
    clock = Clock()
    agent = make_agent(host, tmp_path, clock)
    agent.poll_once()
    host.traffic("vnet0", 300, 400)
    clock.t += 1
    agent.poll_once()
    host.traffic("vnet0", 11, 22)  # the tail, after the last poll
    host.delete("vnet0")
    host.create("vnet0")  # same name, new ifindex
    for _ in range(reboots - 1):
        host.traffic("vnet0", 50, 60)  # a short-lived incarnation's whole life
        host.delete("vnet0")
        host.create("vnet0")
    host.traffic("vnet0", 1000, 2000)
    clock.t += 1
    batch = agent.poll_once()
    assert sum(m.final_at_delete for m in batch.measures) == 2 * reboots  # both directions each
    assert agent.metrics.registry.get_sample_value("kvmeter_agent_final_deltas_total") == reboots
    host.traffic("vnet0", 1, 2)
    clock.t += 1
    agent.poll_once()
    agent.close()
    short = reboots - 1
    assert vm_totals(tmp_path) == {
        pb.VM_RX: 400 + 22 + 60 * short + 2000 + 2,
        pb.VM_TX: 300 + 11 + 50 * short + 1000 + 1,
    }


def test_crash_and_restart_loses_nothing_and_counts_nothing_twice(host: Host, tmp_path: Path) -> None:
    clock = Clock()
    first = make_agent(host, tmp_path, clock)
    first.poll_once()
    host.traffic("vnet0", 50, 60)
    clock.t += 1
    first.poll_once()
    host.traffic("vnet0", 70, 80)  # moved while the agent was dead
    # kill -9: no close, no last poll; a new incarnation opens the same spool
    clock.t += 5
    second = make_agent(host, tmp_path, clock)
    assert second.resumed
    assert second.stream_id != first.stream_id
    second.poll_once()
    host.traffic("vnet0", 1, 1)
    clock.t += 1
    second.poll_once()
    second.close()
    first.spool.close()  # (the "killed" one's file handle, for the test's hygiene only)
    assert vm_totals(tmp_path) == {pb.VM_RX: 141, pb.VM_TX: 121}


def test_a_poll_that_cannot_spool_is_undone_and_nothing_is_lost(host: Host, tmp_path: Path) -> None:
    clock = Clock()
    agent = make_agent(host, tmp_path, clock)
    agent.poll_once()
    host.traffic("vnet0", 10, 20)
    host.delete("vnet0")  # a final event consumed by the failing poll must not be lost
    original = agent.spool.append_poll

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError("disk full")

    agent.spool.append_poll = broken  # type: ignore[method-assign]
    clock.t += 1
    with pytest.raises(OSError, match="disk full"):
        agent.poll_once()
    agent.spool.append_poll = original  # type: ignore[method-assign]
    clock.t += 1
    agent.poll_once()
    agent.close()
    assert vm_totals(tmp_path) == {pb.VM_RX: 20, pb.VM_TX: 10}
    spool = Spool(tmp_path, read_only=True)
    frames = spool.pending()
    assert [f.seq for f in frames] == list(range(1, len(frames) + 1))  # no gap
    # the inventory change of the undone poll (vnet0 gone) goes with the poll that was spooled
    retried = [pb.MeasureBatch.FromString(spool.read_batch(f)) for f in frames[1:]]
    carried = [(d.name, [n.ifindex for n in d.nics]) for b in retried for d in b.inventory]
    assert carried == [("i-2-10-VM", [0])]


def test_a_started_agent_passes_the_collector_over_young_objects_less_often(
    host: Host, tmp_path: Path
) -> None:
    import gc

    from kvmeter.agent.gc_pace import COLLECTOR_YOUNG_THRESHOLD

    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 11, 12)
        agent = make_agent(host, tmp_path, Clock())  # started, as `kvmeter agent` starts it
        agent.close()
        assert gc.get_threshold() == (COLLECTOR_YOUNG_THRESHOLD, 11, 12)
        assert COLLECTOR_YOUNG_THRESHOLD > 700
    finally:
        gc.set_threshold(*before)


def test_shutdown_sends_a_final_batch(host: Host, tmp_path: Path) -> None:
    clock = Clock()
    agent = make_agent(host, tmp_path, clock)
    agent.poll_once()
    host.traffic("vnet0", 5, 5)
    agent.stop_event.set()
    agent.run()  # stop already requested: straight to the last poll
    agent.close()
    spool = Spool(tmp_path, read_only=True)
    last = pb.MeasureBatch.FromString(spool.read_batch(spool.pending()[-1]))
    assert last.final
    assert sum(m.bytes for m in last.measures) == 10


def test_inventory_rides_along_on_the_first_batch_and_on_change(host: Host, tmp_path: Path) -> None:
    clock = Clock()
    agent = make_agent(host, tmp_path, clock)
    first = agent.poll_once()
    second = agent.poll_once()
    agent.close()
    assert [d.name for d in first.inventory] == ["i-2-10-VM"]
    assert first.inventory[0].nics[0].ifindex == 10
    assert list(second.inventory) == []


def test_vhost_user_nic_is_counted_through_libvirt_from_the_guest_side(host: Host, tmp_path: Path) -> None:
    vhu = NicInfo(mac="02:00:00:00:00:09", device="vhu-9", nic_type="vhostuser")
    dom = DomainInfo(uuid="u-9", name="i-2-19-VM", state="running", kind="user_vm", nics=(vhu,))
    inventory = FakeInventory((DOMAIN, dom))
    inventory.stats["vhu-9"] = (100, 1, 200, 2)
    clock = Clock()
    agent = make_agent(host, tmp_path, clock, inventory)
    agent.poll_once()
    inventory.stats["vhu-9"] = (1100, 3, 500, 5)  # the guest received 1000 and sent 300
    clock.t += 1
    batch = agent.poll_once()
    agent.close()
    got = {m.direction: m.bytes for m in batch.measures if m.mac == vhu.mac}
    assert got == {pb.VM_RX: 1000, pb.VM_TX: 300}


class VfCounters:
    """A counter source beside the kernel's table and libvirt (as an SR-IOV VF's would be):
    host-side counters per VF, scripted."""

    def __init__(self) -> None:
        self.counters: dict[str, tuple[int, int, int, int]] = {}
        self.asked: list[list[str]] = []

    def claims(self, nic: NicInfo) -> bool:
        return nic.nic_type == "hostdev"

    def read(self, nics: Sequence[tuple[str, DomainInfo, NicInfo]]) -> CounterTable:
        self.asked.append([name for name, _, _ in nics])
        names = [name for name, _, _ in nics if name in self.counters]
        rows = [self.counters[name] for name in names]
        return CounterTable(names, *([row[i] for row in rows] for i in range(4)))


def test_a_third_counter_source_plugs_in_without_a_daemon_branch(host: Host, tmp_path: Path) -> None:
    vf = NicInfo(mac="02:00:00:00:00:0a", device="vf-3", nic_type="hostdev", bridge="cloudbr0")
    vhu = NicInfo(mac="02:00:00:00:00:09", device="vhu-9", nic_type="vhostuser")
    dom = DomainInfo(uuid="u-9", name="i-2-19-VM", state="running", kind="user_vm", nics=(vf, vhu))
    inventory = FakeInventory((DOMAIN, dom))
    source = VfCounters()
    source.counters["vf-3"] = (10, 1, 20, 2)
    clock = Clock()
    agent = make_agent(host, tmp_path, clock, inventory, sources=[source])
    agent.poll_once()
    source.counters["vf-3"] = (510, 4, 2020, 9)  # the host side received 500 and sent 2000
    host.traffic("vnet0", 7, 11)
    clock.t += 1
    batch = agent.poll_once()
    agent.close()
    got = {(m.device, m.direction): m.bytes for m in batch.measures}
    assert got == {
        ("vf-3", pb.VM_TX): 500,
        ("vf-3", pb.VM_RX): 2000,
        ("vnet0", pb.VM_TX): 7,
        ("vnet0", pb.VM_RX): 11,
    }  # vhu-9: no source claims it among the ones given, so it is not metered
    assert source.asked == [["vf-3"], ["vf-3"]]


def test_nic_whose_target_dev_is_not_a_link_is_matched_by_tap_mac(host: Host, tmp_path: Path) -> None:
    renamed = NicInfo(mac="02:00:00:00:00:01", device="testnet0", nic_type="bridge")
    dom = DomainInfo(uuid="u-1", name="i-2-10-VM", state="running", kind="user_vm", nics=(renamed,))
    clock = Clock()
    macs = {"vnet0": "fe:00:00:00:00:01", "lo": "00:00:00:00:00:00"}
    agent = make_agent(host, tmp_path, clock, FakeInventory((dom,)), read_mac=macs.get)
    agent.poll_once()
    host.traffic("vnet0", 10, 20)
    clock.t += 1
    batch = agent.poll_once()
    agent.close()
    assert {(m.device, m.direction, m.bytes) for m in batch.measures} == {
        ("vnet0", pb.VM_RX, 20),
        ("vnet0", pb.VM_TX, 10),
    }


def test_dry_runs_show_the_inventory_without_taking_it_off_the_next_batch(host: Host, tmp_path: Path) -> None:
    clock = Clock()
    agent = make_agent(host, tmp_path, clock)
    assert len(agent.poll_once(dry_run=True).inventory) == 1  # --once: the baseline
    assert len(agent.poll_once(dry_run=True).inventory) == 1  # --once: what it prints
    assert len(agent.poll_once().inventory) == 1
    assert len(agent.poll_once().inventory) == 0
    agent.close()
    assert [f.seq for f in Spool(tmp_path, read_only=True).pending()] == [1, 2]  # dry runs spool nothing


class VersionedTopology(FakeTopology):
    """A topology that says when its links changed (as the real one does): the agent keeps its
    poll plan (metered links, attribution, placements) while the generation stands still."""

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self.generation = 0
        self.placements: dict[str, LinkPlacement] = {}
        host.listeners.append(self._changed)

    def _changed(self, _event: Any) -> None:
        self.generation += 1
        self.placements.clear()

    def placement(self, ifname: str) -> LinkPlacement:
        # the same object until a change, as the real topology's cache hands out
        return self.placements.setdefault(ifname, super().placement(ifname))


def test_between_full_inventories_a_batch_carries_only_the_domains_that_changed(
    host: Host, tmp_path: Path
) -> None:
    host.links["vnet1"], host.counters["vnet1"], host.next_ifindex = 11, [0, 0, 0, 0], 12
    nic = NicInfo(mac="02:00:00:00:00:02", device="vnet1", nic_type="bridge", bridge="cloudbr0")
    other = DomainInfo(uuid="u-2", name="i-2-11-VM", state="running", kind="user_vm", nics=(nic,))
    clock = Clock()
    settings = {"agent": {"host_id": "h1", "inventory_every": 3}}
    topology = VersionedTopology(host)
    agent = make_agent(host, tmp_path, clock, FakeInventory((DOMAIN, other)), settings, topology=topology)
    carried = []
    for reboot in (None, "vnet0", "vnet0", "vnet0", None, "vnet1", None, None):
        if reboot is not None:  # the tap made again: its domain's record has a new ifindex
            host.delete(reboot)
            host.create(reboot)
        host.traffic("vnet0", 10, 20)
        clock.t += 1
        inventory = agent.poll_once().inventory
        carried.append({d.name: [n.ifindex for n in d.nics] for d in inventory})
    agent.close()
    # every record on the first batch and every 3 polls, changes or not; between those, the
    # records written since the last batch that carried any (the host hands out ifindexes 12,
    # 13, 14 to vnet0's new incarnations, then 15 to vnet1's)
    assert carried == [
        {"i-2-10-VM": [10], "i-2-11-VM": [11]},
        {"i-2-10-VM": [12]},
        {"i-2-10-VM": [13]},
        {"i-2-10-VM": [14], "i-2-11-VM": [11]},
        {},
        {"i-2-11-VM": [15]},
        {"i-2-10-VM": [14], "i-2-11-VM": [15]},
        {},
    ]
    assert vm_totals(tmp_path) == {pb.VM_RX: 7 * 20, pb.VM_TX: 7 * 10}  # the first poll: the baseline


def test_kept_poll_plan_counts_a_reboot_exactly(host: Host, tmp_path: Path) -> None:
    clock = Clock()
    topology = VersionedTopology(host)
    agent = make_agent(host, tmp_path, clock, topology=topology)
    agent.poll_once()
    plan = agent._plan
    host.traffic("vnet0", 300, 400)
    clock.t += 1
    assert list(agent.poll_once().inventory) == []
    assert agent._plan is plan  # nothing changed: nothing re-derived
    host.traffic("vnet0", 11, 22)
    host.delete("vnet0")
    host.create("vnet0")
    host.traffic("vnet0", 1000, 2000)
    clock.t += 1
    after = agent.poll_once()
    assert agent._plan is not plan
    # the inventory goes again, with the new incarnation's ifindex
    assert [nic.ifindex for d in after.inventory for nic in d.nics] == [host.links["vnet0"]]
    # the old incarnation's attribution went with it, the new one's stayed
    assert set(agent._attribution) == set(agent.engine.tracked_keys())
    host.traffic("vnet0", 1, 2)
    clock.t += 1
    later = agent.poll_once()  # by columns: the new incarnation's templates
    agent.close()
    assert list(later.inventory) == []
    assert {m.ifindex for m in later.measures if m.device == "vnet0"} == {host.links["vnet0"]}
    assert vm_totals(tmp_path) == {pb.VM_RX: 400 + 22 + 2000 + 2, pb.VM_TX: 300 + 11 + 1000 + 1}


def test_a_poll_bigger_than_a_record_goes_out_as_consecutive_batches(tmp_path: Path) -> None:
    host = Host()
    nics = []
    for i in range(1, 60):
        name = f"vnet{i}"
        host.links[name] = 100 + i
        host.counters[name] = [0, 0, 0, 0]
        nics.append(NicInfo(mac=f"02:00:00:00:01:{i:02x}", device=name, nic_type="bridge", bridge="cloudbr0"))
    domains = tuple(
        DomainInfo(
            uuid=f"u-{i}", name=f"i-2-{i}-VM", state="running", kind="user_vm", nics=tuple(nics[i : i + 3])
        )
        for i in range(0, len(nics), 3)
    )
    clock = Clock()
    agent = make_agent(host, tmp_path, clock, FakeInventory(domains), {"kafka": {"max_batch_bytes": 2048}})
    first = [pb.MeasureBatch.FromString(b) for b in agent.poll()]  # baseline + the whole inventory
    assert len(first) > 1
    assert sum(len(b.inventory) for b in first) == len(domains)
    for step in range(2):  # a steady poll (by columns) and one with a new link (by rows)
        if step == 1:
            host.create("vnet99")
        for nic in nics:
            host.traffic(nic.device or "", 1000, 3000)
        clock.t += 10
        batches = agent.poll(final=step == 1)
        decoded = [pb.MeasureBatch.FromString(b) for b in batches]
        assert len(batches) > 1
        assert all(len(b) <= 2048 for b in batches)
        assert sum(len(b.measures) for b in decoded) == 2 * len(nics)
        assert [b.final for b in decoded] == [False] * (len(decoded) - 1) + [step == 1]
        assert len({b.poll_time for b in decoded}) == 1
    agent.close()
    spooled = Spool(tmp_path, read_only=True).pending()
    assert [f.seq for f in spooled] == list(range(1, len(spooled) + 1))  # consecutive, no gap
    assert vm_totals(tmp_path) == {pb.VM_RX: 2 * 3000 * len(nics), pb.VM_TX: 2 * 1000 * len(nics)}


def test_a_tap_made_again_while_the_counters_are_read_waits_for_the_next_poll(
    host: Host, tmp_path: Path
) -> None:
    """The table read may hold the new incarnation's counters under the name the link map
    gave the old one: that name is left out of the poll (its links before and after the read
    differ), and its events come with the next one."""
    clock = Clock()
    topology = VersionedTopology(host)
    reboot_during_read = [False]

    def read_text() -> str:
        if reboot_during_read[0]:
            reboot_during_read[0] = False
            host.traffic("vnet0", 11, 22)
            host.delete("vnet0")
            host.create("vnet0")
            host.traffic("vnet0", 1000, 2000)
        return host.text()

    agent = make_agent(host, tmp_path, clock, topology=topology, read_text=read_text)
    agent.poll_once()
    host.traffic("vnet0", 300, 400)
    clock.t += 1
    agent.poll_once()
    reboot_during_read[0] = True
    clock.t += 1
    agent.poll_once()
    for _ in range(2):
        host.traffic("vnet0", 1, 2)
        clock.t += 1
        agent.poll_once()
    agent.close()
    assert vm_totals(tmp_path) == {pb.VM_RX: 400 + 22 + 2000 + 4, pb.VM_TX: 300 + 11 + 1000 + 2}


@pytest.mark.parametrize("kept_plan", [False, True])
def test_a_tap_made_again_before_its_old_incarnation_closes_is_counted_for_its_vm(
    host: Host, tmp_path: Path, kept_plan: bool
) -> None:
    """The new incarnation is in the table before the old one's deletion event came (a late
    RTM_DELLINK): it waits for the old one's close, keeping whose it is, and every byte of
    both goes to the VM."""
    clock = Clock()
    agent = make_agent(
        host, tmp_path, clock, topology=(VersionedTopology if kept_plan else FakeTopology)(host)
    )
    agent.poll_once()
    host.traffic("vnet0", 300, 400)
    clock.t += 1
    agent.poll_once()
    host.traffic("vnet0", 11, 22)
    old = host.counters.pop("vnet0"), host.links.pop("vnet0")  # gone, its event not here yet
    host.create("vnet0")
    host.traffic("vnet0", 1000, 2000)
    for _ in range(2):
        clock.t += 1
        agent.poll_once()
        host.traffic("vnet0", 5, 6)
    (c, index) = old
    for cb in host.listeners:
        cb(LinkEvent("del", "vnet0", index, (c[0], c[1], c[2], c[3])))
    for _ in range(2):
        clock.t += 1
        agent.poll_once()
    agent.close()
    assert vm_totals(tmp_path) == {pb.VM_RX: 400 + 22 + 2000 + 6 * 2, pb.VM_TX: 300 + 11 + 1000 + 5 * 2}
