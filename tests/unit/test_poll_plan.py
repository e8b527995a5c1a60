"""The poll plan updated for what changed equals one built from scratch: after any sequence of
taps deleted, made again, moved or added, domains coming, going or changing, and placements
that all move, (1) the plan's metered links, keys, NICs, placements, rows and inventory
signature equal a fresh plan's, and (2) an agent that updates its plan writes byte for byte
the batches of one that builds every plan from scratch. Also: the topology's change log names
every link whose ifindex or placement moved since a generation."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmeter.agent.counters import CounterTable
from kvmeter.agent.daemon import Agent
from kvmeter.agent.linktable import RTM_DELLINK, RTM_NEWLINK, LinkRecord, LinkTable
from kvmeter.agent.metered import MeteredLinks, tap_mac
from kvmeter.agent.model import CounterKey, DomainInfo, LinkPlacement, NicInfo
from kvmeter.agent.plan import _ROWS_PER_RUN, Planner, PollPlan, _runs
from kvmeter.agent.spool import Spool
from kvmeter.agent.traffic import TrafficRules
from kvmeter.proto import pb
from tests.unit.test_agent_daemon import agent_config

RULES = TrafficRules.from_config({"rules": [{"vni": "5000-5999", "type": "guest"}]})
TAPS = 12
BRIDGES = {1: "brvx-5001", 2: "brvx-5002"}


def mac(i: int) -> str:
    return f"52:54:00:00:00:{i:02x}"


class World:
    """A host's links (a real LinkTable, so placements are cached and dropped as the topology
    does) with counters, and its libvirt domains; each step is one kind of change."""

    def __init__(self) -> None:
        self.table = LinkTable(RULES)
        self.next_index = 100
        self.counters: dict[int, list[int]] = {}
        self.macs: dict[str, str] = {}
        self.listeners: list[Callable[[Any], None]] = []
        self.table.replace_all(
            [LinkRecord(ifindex=1, ifname="lo")]
            + [LinkRecord(ifindex=i, ifname=name, kind="bridge") for i, name in BRIDGES.items()]
        )
        self.domains: dict[str, DomainInfo] = {}
        for i in range(TAPS):
            self.make_tap(i, master=1 + i % 2)
        for d in range(0, TAPS - 2, 2):
            self.set_domain(d, "running", (d, d + 1))

    # -- links -----------------------------------------------------------------------------
    def make_tap(self, i: int, master: int) -> None:
        index = self.next_index
        self.next_index += 1
        self.counters[index] = [0, 0, 0, 0]
        self.macs[f"vnet{i}"] = tap_mac(mac(i))
        self.apply(RTM_NEWLINK, LinkRecord(ifindex=index, ifname=f"vnet{i}", kind="tun", master=master))

    def delete_tap(self, i: int) -> None:
        index = self.table.ifindex(f"vnet{i}")
        if index is None:
            return
        c = self.counters.pop(index)
        self.apply(RTM_DELLINK, LinkRecord(ifindex=index, ifname=f"vnet{i}", stats=(c[0], c[1], c[2], c[3])))

    def move_tap(self, i: int) -> None:
        record = self.table.record(f"vnet{i}")
        if record is not None:
            master = 2 if record.master == 1 else 1
            self.apply(
                RTM_NEWLINK,
                LinkRecord(ifindex=record.ifindex, ifname=record.ifname, kind="tun", master=master),
            )

    def add_uplink(self) -> None:
        """A VXLAN uplink joins a bridge: every port's placement may move."""
        index = self.next_index
        self.next_index += 1
        self.apply(
            RTM_NEWLINK,
            LinkRecord(ifindex=index, ifname=f"vxlan{index}", kind="vxlan", master=1, vxlan_vni=5001),
        )

    def apply(self, msg_type: int, record: LinkRecord) -> None:
        event = self.table.apply(msg_type, record)
        if event is not None:
            for callback in self.listeners:
                callback(event)

    def traffic(self, seed: int) -> None:
        for index, c in self.counters.items():
            c[0] += 100 + (index * seed) % 97
            c[1] += 1
            c[2] += 200 + (index + seed) % 89
            c[3] += 1

    def counter_table(self, *, by_name: bool = False) -> CounterTable:
        """The kernel's table as netlink gives it (rows by ifindex), or as /proc/net/dev does."""
        links = self.table.links()
        names = sorted(links, key=links.__getitem__)
        rows = [self.counters.get(links[name], [0, 0, 0, 0]) for name in names]
        return CounterTable(
            names if by_name else [],
            [r[0] for r in rows],
            [r[1] for r in rows],
            [r[2] for r in rows],
            [r[3] for r in rows],
            ifindexes=None if by_name else [links[name] for name in names],
        )

    # -- domains ---------------------------------------------------------------------------
    def set_domain(
        self, d: int, state: str, taps: tuple[int, ...], *, by_mac: bool = False, device: str = "vnet"
    ) -> None:
        """`device`: the prefix of the NICs' target devs (another than the taps': no link has them)."""
        nics = tuple(
            NicInfo(
                mac=mac(i), device=None if by_mac else device + str(i), nic_type="bridge", bridge="brvx-5001"
            )
            for i in taps
        )
        uuid = f"00000000-0000-0000-0000-{d:012d}"
        self.domains[uuid] = DomainInfo(uuid=uuid, name=f"i-2-{d}-VM", state=state, kind="user_vm", nics=nics)

    def drop_domain(self, d: int) -> None:
        self.domains.pop(f"00000000-0000-0000-0000-{d:012d}", None)


class WorldTopology:
    def __init__(self, world: World) -> None:
        self.world = world

    def start(self) -> None: ...
    def stop(self) -> None: ...

    @property
    def generation(self) -> int:
        return self.world.table.generation

    def changed_since(self, generation: int) -> set[str] | None:
        return self.world.table.changed_since(generation)

    def placement(self, ifname: str) -> LinkPlacement:
        return self.world.table.placement(ifname)

    def address(self, ifname: str, ifindex: int) -> str | None:
        return self.world.table.address(ifname, ifindex)

    def links(self) -> dict[str, int]:
        return self.world.table.links()

    def add_listener(self, callback: Callable[[Any], None]) -> None:
        self.world.listeners.append(callback)

    def set_rules(self, rules: Any) -> None: ...


class WorldInventory:
    def __init__(self, world: World) -> None:
        self.world = world

    def start(self) -> None: ...
    def stop(self) -> None: ...

    def snapshot(self) -> dict[str, DomainInfo]:
        return dict(self.world.domains)

    def interface_stats(self, uuid: str, device: str, timeout: float = 2.0) -> None:
        return None


# One step: (kind, tap or domain number, a second number)
step = st.tuples(
    st.sampled_from(
        [
            "replace",
            "replace",
            "replace",
            "delete",
            "make",
            "move",
            "uplink",
            "domain",
            "state",
            "drop",
            "by_mac",
            "share",
            "renamed",
        ]
    ),
    st.integers(0, TAPS - 1),
    st.integers(0, TAPS - 1),
)


def do(world: World, kind: str, i: int, j: int) -> None:
    if kind == "replace":  # a VM reboot or a storm's tap: deleted and made again
        world.delete_tap(i)
        world.make_tap(i, master=1 + i % 2)
    elif kind == "delete":
        world.delete_tap(i)
    elif kind == "make" and world.table.ifindex(f"vnet{i}") is None:
        world.make_tap(i, master=1 + j % 2)
    elif kind == "move":
        world.move_tap(i)
    elif kind == "uplink":
        world.add_uplink()
    elif kind == "domain":  # a VM starting with two taps
        world.set_domain(i, "running", (i, j))
    elif kind == "state":
        world.set_domain(i, "shutoff", (i,))
    elif kind == "drop":
        world.drop_domain(i)
    elif kind == "by_mac":  # a NIC libvirt has not named: matched by MAC
        world.set_domain(i, "running", (i,), by_mac=True)
    elif kind == "share":  # two domains naming one tap
        world.set_domain(i, "running", (i,))
        world.set_domain(j + 100, "paused", (i,))
    elif kind == "renamed":  # a target dev that is no link: the tap with its MAC is matched, if free
        world.set_domain(j + 200, "running", (i,), device="old")


def fresh_plan(world: World) -> PollPlan:
    links = MeteredLinks("boot", world.macs.get, lambda nic: False)
    planner = Planner(links, world.table.placement, (), lambda nic: None)
    return planner.build(world.table.generation, world.table.links(), list(world.domains.values()))


def inventory_of(plan: PollPlan) -> dict[str, tuple]:
    """What each domain's inventory record is written from: the domain, its devices' placements
    and ifindexes."""
    return {
        d.uuid: (d, *((plan.placements.get(n.device), plan.links.get(n.device)) for n in d.nics if n.device))
        for d in plan.domains
    }


def assert_same_plan(kept: PollPlan, fresh: PollPlan, world: World) -> None:
    assert kept.links == fresh.links
    assert kept.devices == fresh.devices
    assert kept.keys == fresh.keys
    assert kept.metered == fresh.metered
    assert kept.placements == fresh.placements
    assert kept.present == fresh.present
    assert [d.uuid for d in kept.ordered] == [d.uuid for d in fresh.ordered]
    assert all(a is b for a, b in zip(kept.ordered, fresh.ordered, strict=True))
    assert inventory_of(kept) == inventory_of(fresh)
    for by_name in (False, True):
        table = world.counter_table(by_name=by_name)
        assert kept.rows_of(table) == fresh.rows_of(table)
        assert_columns_are_the_rows(kept, table)


def assert_columns_are_the_rows(plan: PollPlan, table: CounterTable) -> None:
    keys, rows = plan.rows_of(table)
    columns = (table.rx_bytes, table.rx_packets, table.tx_bytes, table.tx_packets)
    assert plan.columns_of(table) == (keys, [[column[r] for r in rows] for column in columns])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.booleans(), max_size=200), st.integers(1, 12))
def test_rows_in_runs_are_gathered_by_slices_that_hold_them_all(metered: list[bool], stretch: int) -> None:
    # `stretch`: each row repeated so, for runs long enough to pay as well as short ones
    rows = [r for r, m in enumerate(m for m in metered for _ in range(stretch)) if m]
    runs = _runs(rows)
    starts = [i for i, r in enumerate(rows) if i == 0 or rows[i - 1] != r - 1]
    if len(starts) > 1 and len(starts) * _ROWS_PER_RUN > len(rows):
        assert runs is None
    else:
        assert runs is not None
        assert len(runs) == len(starts)
        assert [r for run in runs for r in range(run.start, run.stop)] == rows


def test_a_hosts_taps_between_its_other_links_are_gathered_run_by_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys.modules[__name__], "TAPS", 60)
    world = World()
    table = world.counter_table()
    plan = fresh_plan(world)
    assert_columns_are_the_rows(plan, table)
    assert plan.row_runs is not None
    assert len(plan.row_runs) == 1
    # a storm's new taps after the host's unmetered taps, an uplink made amid them: three runs
    for i in range(20, 40):
        if i == 30:
            world.add_uplink()
        do(world, "replace", i, 0)
    world.traffic(1)
    table = world.counter_table()
    plan = fresh_plan(world)
    assert_columns_are_the_rows(plan, table)
    assert plan.row_runs is not None
    assert len(plan.row_runs) == 3


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(step, min_size=1, max_size=4), min_size=1, max_size=8), st.integers(0, 2))
def test_an_updated_plan_equals_one_built_from_scratch(
    rounds: list[list[tuple[str, int, int]]], unreported: int
) -> None:
    # `unreported`: how many of the links the topology says came, went or took another
    # ifindex the update is not told of (it finds them in the link maps; a link that moved to
    # another bridge it learns of from the topology only)
    world = World()
    links = MeteredLinks("boot", world.macs.get, lambda nic: False)
    planner = Planner(links, world.table.placement, (), lambda nic: None)
    plan = planner.build(world.table.generation, world.table.links(), list(world.domains.values()))
    for steps in rounds:
        for kind, i, j in steps:
            do(world, kind, i, j)
        generation = world.table.generation
        before = inventory_of(plan)  # the update consumes the plan
        changed = world.table.changed_since(plan.generation or 0)
        links = world.table.links()
        if changed is not None:
            in_maps = sorted(name for name in changed if plan.links.get(name) != links.get(name))
            changed -= set(in_maps[:unreported])
        updated = planner.update(plan, generation, links, list(world.domains.values()), changed)
        if updated is not None:
            # every domain whose inventory record may differ is touched
            after = inventory_of(updated)
            assert {
                u for u in before.keys() | after.keys() if before.get(u) != after.get(u)
            } <= updated.touched
        plan = updated or planner.build(generation, world.table.links(), list(world.domains.values()))
        assert_same_plan(plan, fresh_plan(world), world)


def update(planner: Planner, plan: PollPlan, world: World) -> PollPlan | None:
    return planner.update(
        plan,
        world.table.generation,
        world.table.links(),
        list(world.domains.values()),
        world.table.changed_since(plan.generation or 0),
    )


def test_a_storm_round_updates_the_plan_instead_of_building_it() -> None:
    world = World()
    links = MeteredLinks("boot", world.macs.get, lambda nic: False)
    planner = Planner(links, world.table.placement, (), lambda nic: None)
    plan = planner.build(world.table.generation, world.table.links(), list(world.domains.values()))
    kept = dict(plan.placements)
    before = dict(plan.metered)
    for i in (0, 3, 4):
        do(world, "replace", i, 0)
    updated = update(planner, plan, world)
    assert updated is not None
    # only the new taps, each with its last incarnation's key
    assert sorted(updated.remember) == [(name, before[name]) for name in ("vnet0", "vnet3", "vnet4")]
    assert updated.touched == {
        "00000000-0000-0000-0000-000000000000",
        "00000000-0000-0000-0000-000000000002",
        "00000000-0000-0000-0000-000000000004",
    }
    for name, placement in kept.items():
        if name not in ("vnet0", "vnet3", "vnet4"):
            assert updated.placements[name] is placement
    assert_same_plan(updated, fresh_plan(world), world)
    # NICs matched by MAC depend on every link: such a plan is built from scratch
    do(world, "by_mac", 8, 0)
    assert update(planner, updated, world) is None


def test_a_running_vm_whose_tap_went_first_keeps_the_plan_updated() -> None:
    world = World()
    read_macs: list[str] = []

    def read_mac(name: str) -> str | None:
        read_macs.append(name)
        return world.macs.get(name)

    links = MeteredLinks("boot", read_mac, lambda nic: False)
    planner = Planner(links, world.table.placement, (), lambda nic: None)
    plan = planner.build(world.table.generation, world.table.links(), list(world.domains.values()))
    # VMs stopping: their taps go before libvirt says the domains are shut off
    world.delete_tap(0)
    world.delete_tap(3)
    updated = update(planner, plan, world)
    assert updated is not None
    assert updated.unlinked == {"vnet0", "vnet3"}
    assert_same_plan(updated, fresh_plan(world), world)
    # only the links no NIC names were read for their MACs (the bridges, the free taps)
    assert sorted(read_macs) == sorted([*BRIDGES.values(), "vnet10", "vnet11"])
    assert set(read_macs) == set(world.table.links()) - {f"vnet{i}" for i in range(10)}
    read_macs.clear()
    # a build with the taps missing is updated too, and reads no claimed link's MAC
    plan = planner.build(world.table.generation, world.table.links(), list(world.domains.values()))
    assert plan.named is not None
    assert plan.unlinked == {"vnet0", "vnet3"}
    assert read_macs == []  # each link incarnation's MAC is read once
    world.make_tap(0, master=1)  # the tap back (a VM started again before its domain was seen)
    updated = update(planner, plan, world)
    assert updated is not None
    assert updated.unlinked == {"vnet3"}
    assert_same_plan(updated, fresh_plan(world), world)


def test_a_free_link_with_an_unlinked_nics_mac_rebuilds_the_plan() -> None:
    world = World()
    links = MeteredLinks("boot", world.macs.get, lambda nic: False)
    planner = Planner(links, world.table.placement, (), lambda nic: None)
    do(world, "renamed", 3, 0)  # a running NIC named old3 with vnet3's MAC, which domain 2 names
    plan = planner.build(world.table.generation, world.table.links(), list(world.domains.values()))
    assert plan.named is not None
    assert plan.unlinked == {"old3"}
    assert plan.devices["vnet3"][0].uuid.endswith("000000000002")
    world.drop_domain(2)  # vnet3 is free: old3's NIC is matched to it by MAC
    assert update(planner, plan, world) is None
    fresh = fresh_plan(world)
    assert fresh.devices["vnet3"][0].uuid.endswith("000000000200")
    assert fresh.named is None  # (matched by MAC: built again from scratch)


def in_buckets(table: CounterTable) -> CounterTable:
    """The table as an older kernel lists it: in buckets (here of ifindexes modulo 7), the
    newest link first in each."""
    ifindexes = table.ifindexes or list(range(len(table.rx_bytes)))  # (by name: made in this order)
    order = sorted(range(len(ifindexes)), key=lambda r: (ifindexes[r] % 7, -ifindexes[r]))
    columns = [[column[r] for r in order] for column in table[:5] if column]
    names = columns.pop(0) if table.names else []
    ids = [ifindexes[r] for r in order] if table.ifindexes is not None else None
    return CounterTable(names, *columns, ifindexes=ids)


@pytest.mark.parametrize("by_name", [False, True])
def test_rows_come_by_ifindex_whatever_order_the_kernel_lists_them_in(by_name: bool) -> None:
    """So a storm's poll lists the taps that stayed, in their last order, then the new ones
    (what the engine and the encoder take whole), on kernels that list links in buckets too."""
    world = World()
    last: tuple[CounterKey, ...] = ()
    for storm in ((), (1, 3, 4), (0, 3)):
        for i in storm:
            do(world, "replace", i, 0)
        plan = fresh_plan(world)
        table = in_buckets(world.counter_table(by_name=by_name))
        keys, rows = plan.rows_of(table)
        assert sorted(keys) == sorted(plan.metered.values())  # each metered link's row, once
        assert [k.ifindex for k in keys] == sorted(k.ifindex for k in keys)
        for key, row in zip(keys, rows, strict=True):
            assert (table.names[row] if by_name else table.ifindexes[row]) == (
                key.name if by_name else key.ifindex
            )  # type: ignore[index]
        assert_columns_are_the_rows(plan, table)
        stayed = tuple(k for k in last if k in set(keys))
        assert keys[: len(stayed)] == stayed
        assert len(stayed) == len(last) - len(storm)
        last = keys


class ClockPair:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


def make_agent(world: World, spool_dir: Path, clock: ClockPair, *, incremental: bool) -> Agent:
    agent = Agent(
        agent_config({"agent": {"host_id": "h1"}}),
        inventory=WorldInventory(world),
        topology=WorldTopology(world),
        spool=Spool(spool_dir),
        boot_id="boot",
        read_mac=world.macs.get,
        wall=clock,
        mono=clock,
    )
    agent._table.read = world.counter_table  # type: ignore[method-assign]
    if not incremental:  # every plan built from scratch, every steady encoder from its pairs
        agent._planner.update = lambda *args: None  # type: ignore[method-assign]
        agent._encoder_after_last = lambda *args: None  # type: ignore[method-assign]
    agent.start()
    return agent


@settings(max_examples=120, deadline=None)
@given(st.lists(st.lists(step, max_size=4), min_size=1, max_size=8))
def test_an_agent_updating_its_plan_writes_the_batches_of_one_that_rebuilds_it(
    tmp_path_factory: Any, rounds: list[list[tuple[str, int, int]]]
) -> None:
    world = World()
    clock = ClockPair()
    updating = make_agent(world, tmp_path_factory.mktemp("updating"), clock, incremental=True)
    rebuilding = make_agent(world, tmp_path_factory.mktemp("rebuilding"), clock, incremental=False)
    rebuilding.stream_id = updating.stream_id
    try:
        assert updating.poll() == rebuilding.poll()
        for n, steps in enumerate(rounds):
            for kind, i, j in steps:
                do(world, kind, i, j)
            world.traffic(n)
            clock.t += 10
            assert updating.poll() == rebuilding.poll()
    finally:
        updating.close()
        rebuilding.close()


def test_what_was_attributed_again_is_kept_only_while_an_encoder_follows_from_the_last(
    tmp_path: Path,
) -> None:
    """Polls that build no steady encoder (NICs counted by another source) would otherwise keep
    every key attributed since, for good; dropped, the next encoder is built from its pairs."""
    world = World()
    agent = make_agent(world, tmp_path, ClockPair(), incremental=True)
    try:
        agent.poll()
        assert agent._last_encoder is not None
        domain = next(iter(world.domains.values()))
        for i in range(len(agent._attribution) + 100):
            agent._remember(CounterKey("boot", 0, f"sourced{i}"), domain, domain.nics[0])
            agent._forget_closed(agent._plan)  # type: ignore[arg-type]
            assert len(agent._reattributed) <= len(agent._attribution) + 64
        assert agent._last_encoder is None
    finally:
        agent.close()


def test_a_tap_made_again_while_its_old_incarnation_is_open_keeps_its_attribution(tmp_path: Path) -> None:
    """vnet0 made again without its deletion seen (no final counters): the new incarnation
    waits, untracked, until the old one is forgotten, and is metered all along. Its attribution
    is set once, when the plan is updated for it, and must outlive the wait: the next plan and
    encoder (another tap's link events) need it, or its bytes are dropped as no VM's."""
    from kvmeter.agent.delta import ABSENT_POLLS_BEFORE_FORGET
    from tests.unit.test_agent_daemon import vm_totals

    world = World()
    clock = ClockPair()
    agent = make_agent(world, tmp_path, clock, incremental=True)
    try:
        agent.poll()  # baseline
        world.traffic(1)
        clock.t += 10
        agent.poll()
        before = vm_totals(tmp_path)
        old = world.table.ifindex("vnet0")
        world.counters.pop(old)
        world.table.apply(RTM_DELLINK, LinkRecord(ifindex=old, ifname="vnet0"))  # gone unseen
        world.make_tap(0, master=1)  # the new incarnation's birth is seen
        new = world.table.ifindex("vnet0")
        for _ in range(ABSENT_POLLS_BEFORE_FORGET + 2):
            world.counters[new][0] += 1000  # the host received what the VM sent
            clock.t += 10
            agent.poll()
        do(world, "replace", 5, 0)  # another tap's link events: the plan and its encoder made anew
        world.counters[new][0] += 1000
        clock.t += 10
        agent.poll()
    finally:
        agent.close()
    moved = {k: v - before[k] for k, v in vm_totals(tmp_path).items()}
    assert moved[pb.VM_TX] == 1000 * (ABSENT_POLLS_BEFORE_FORGET + 3)  # vnet0's only


def test_the_change_log_names_every_link_that_moved() -> None:
    world = World()
    snapshots = {}
    for kind, i, j in [
        ("replace", 1, 0),
        ("move", 2, 0),
        ("delete", 3, 0),
        ("make", 3, 1),
        ("uplink", 0, 0),
        ("replace", 5, 0),
    ]:
        snapshots[world.table.generation] = (
            world.table.links(),
            {n: world.table.placement(n) for n in world.table.links()},
        )
        do(world, kind, i, j)
    now_links = world.table.links()
    now_placements = {n: world.table.placement(n) for n in now_links}
    for generation, (links, placements) in snapshots.items():
        changed = world.table.changed_since(generation)
        if changed is None:
            continue
        moved = {n for n in links.keys() | now_links.keys() if links.get(n) != now_links.get(n)}
        moved |= {n for n in now_links if n in placements and placements[n] != now_placements[n]}
        assert moved <= changed, generation
    # an uplink joining a bridge may move every placement: no list of names since before it
    assert world.table.changed_since(min(snapshots)) is None
    assert world.table.changed_since(world.table.generation) == set()
