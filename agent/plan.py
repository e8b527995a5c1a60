"""The poll plan: what a poll derives from the link map, the placements and the inventory (the
metered links and their counter keys, the domain NICs they belong to, placements, the counter
table's rows to take and the steady encoder). Pure apart from the callables it is given.

A plan is kept from poll to poll while nothing changed. After link events (a VM storm: a tenth
of a host's taps deleted and made again) it is updated for the names that changed only, as the
topology reports them (`Topology.changed_since`), so the poll right after them does no Python
step per interface that stayed: those keep their keys, placements and measure templates, and
their counters stay on the columnar path. A plan the update cannot follow exactly is built
again from scratch (`Planner.build`): NICs matched by MAC or counted by another source, a
device name two NICs claim, a change that may move every placement. A running NIC whose link is
missing (a VM stopping whose tap went first) is followed: the update looks for its MAC among the
links no NIC names, and builds again only when one has it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import chain, compress, repeat
from operator import attrgetter, is_, is_not, ne

from kvmeter.agent.counters import CounterTable
from kvmeter.agent.metered import INACTIVE_STATES, MeteredLinks
from kvmeter.agent.model import CounterKey, DomainInfo, LinkPlacement, NicInfo
from kvmeter.agent.sources import CounterSource, Owned
from kvmeter.agent.wire import SteadyEncoder

Owner = tuple[DomainInfo, NicInfo]
_by_uuid = attrgetter("uuid")
_ifindex = attrgetter("ifindex")
_NO_OWNERS: list[Owner] = []
# Rows are gathered by slices of consecutive rows when they come in runs this long on average (a
# host's taps, made in bursts, between its few other links): a slice per run then costs less
# than a step per row.
_ROWS_PER_RUN = 8


@dataclass
class PollPlan:
    """One plan; see the module's docstring."""

    generation: int | None  # the topology's, read before the links; None: rebuild every poll
    links: dict[str, int]  # the stable name -> ifindex map it was built from
    domains: list[DomainInfo]
    devices: dict[str, Owner]  # host interface -> its domain NIC
    keys: dict[str, CounterKey]  # every stable link's
    metered: dict[str, CounterKey]  # metered host-visible interfaces
    # NICs without a host link, per source that counts them (in the order sources are asked)
    sourced: list[tuple[CounterSource, list[Owned]]]
    present: frozenset[CounterKey]  # every stable link's key
    placements: dict[str, LinkPlacement]  # per NIC device that is a link, for the inventory
    ordered: list[DomainInfo]  # the domains by uuid: the inventory's order
    # NIC device name -> the NICs naming it (every domain); None: not updatable, rebuilt
    named: dict[str, list[Owner]] | None
    # Names whose attribution the agent sets again (all metered ones for a new plan), each with
    # the key it metered before the update (a tap made again: its last incarnation's), if any
    remember: list[tuple[str, CounterKey | None]]
    # Domains whose inventory record may differ from the last plan's (None: any)
    touched: set[str] | None
    # The target devs of running NICs without their link (a VM stopping whose tap went first, a
    # VM starting whose tap is not made yet), each named by one NIC; no link that no NIC names
    # has their MAC. Kept by an update, which builds again when such a link has one.
    unlinked: set[str] = field(default_factory=set)
    # The metered rows of the counter table, for the table layout they were found in (its
    # rows' names, or ifindexes for a netlink table)
    table_layout: list[str] | list[int] | None = None
    row_keys: tuple[CounterKey, ...] = ()
    row_indexes: list[int] = field(default_factory=list)
    row_runs: list[slice] | None = None  # row_indexes as slices, when they pay (see _runs)
    encoder: SteadyEncoder | None = None  # for row_keys; built at the first steady poll
    # The metered keys by ifindex (a netlink table's rows), built when first needed and kept
    # up to date by an update
    by_ifindex: dict[int, CounterKey] | None = None
    # The keys the plan updated from metered and meters no more while their link stays (its NIC
    # left it: a tap that outlived its VM); a built plan leaves them to the agent to find
    released: list[CounterKey] = field(default_factory=list)
    # `present` and the keys of the NICs its sources count (see Measuring._present_with_sourced)
    sourced_present: frozenset[CounterKey] | None = None

    def rows_of(self, table: CounterTable) -> tuple[tuple[CounterKey, ...], list[int]]:
        """The metered interfaces' keys and their rows in the table, in the order of their
        ifindexes: a VM storm's poll then lists the taps that stayed in their last order and
        the new ones after them (ifindexes only grow), which the engine and the encoder take
        whole (see LastReadings.positions). Recent kernels list links so; older ones in buckets
        (of ifindexes for a netlink dump, of names for /proc/net/dev). The layout rarely changes
        between polls: one list comparison then; and when it did, C-level passes over the
        table."""
        layout = table.names if table.ifindexes is None else table.ifindexes
        if layout != self.table_layout:
            ifindexes: Sequence[int]
            if table.ifindexes is None:
                found = list(map(self.metered.get, table.names))
                # (the fallback's table: a Python step per row, when its layout changed)
                ifindexes = [key.ifindex if key is not None else 0 for key in found]
            else:  # a row is a metered link's when its ifindex is the one the plan's key holds
                if self.by_ifindex is None:
                    keys = self.metered.values()
                    self.by_ifindex = dict(zip(map(_ifindex, keys), keys))
                found = list(map(self.by_ifindex.get, table.ifindexes))
                ifindexes = table.ifindexes
            rows = list(compress(range(len(found)), found))  # (a key is a non-empty tuple: true)
            in_order = ifindexes == sorted(ifindexes)
            if in_order:
                self.row_keys = tuple(filter(None, found))  # already in order (one pass to see it)
            else:
                rows.sort(key=ifindexes.__getitem__)
                self.row_keys = tuple(map(found.__getitem__, rows))  # type: ignore[arg-type]  # no None at them
            self.table_layout = layout
            self.row_indexes = rows
            self.row_runs = _runs(rows) if in_order else None
            self.encoder = None
        return self.row_keys, self.row_indexes

    def columns_of(self, table: CounterTable) -> tuple[tuple[CounterKey, ...], list[list[int]]]:
        """The metered interfaces' keys (rows_of) and their rx_bytes, rx_packets, tx_bytes and
        tx_packets, as four new lists: by slices when the rows come in runs (a host's taps)."""
        keys, rows = self.rows_of(table)
        columns = (table.rx_bytes, table.rx_packets, table.tx_bytes, table.tx_packets)
        runs = self.row_runs
        if runs is None:
            return keys, [list(map(column.__getitem__, rows)) for column in columns]
        if len(runs) == 1:
            return keys, [column[runs[0]] for column in columns]
        return keys, [list(chain.from_iterable(map(column.__getitem__, runs))) for column in columns]

    def still_valid(self, generation: int | None, links: dict[str, int], domains: list[DomainInfo]) -> bool:
        return (
            generation is not None
            and generation == self.generation
            and (links is self.links or links == self.links)
            and len(domains) == len(self.domains)
            and all(map(is_, domains, self.domains))
        )


class Planner:
    """Builds plans (`build`) and updates them after link or domain changes (`update`)."""

    def __init__(
        self,
        links: MeteredLinks,
        placement: Callable[[str], LinkPlacement],
        sources: Sequence[CounterSource],
        source_of: Callable[[NicInfo], int | None],
        completed: Callable[[LinkPlacement, NicInfo], LinkPlacement] | None = None,
    ) -> None:
        self._links = links
        self._placement = placement
        self._sources = sources
        self._source_of = source_of
        # A link's placement completed by what libvirt says of its NIC (agent.nic_placement)
        self._completed = completed

    def _placed(self, name: str, nic: NicInfo) -> LinkPlacement:
        placement = self._placement(name)
        return self._completed(placement, nic) if self._completed is not None else placement

    def build(self, generation: int | None, stable: dict[str, int], domains: list[DomainInfo]) -> PollPlan:
        devices = self._links.resolve(domains, stable)
        keys = self._links.keys(stable)
        metered = {name: keys[name] for name in devices if name in keys}
        placements = {}
        ordered = sorted(domains, key=_by_uuid)
        for domain in ordered:
            for nic in domain.nics:
                if nic.device and nic.device in stable:
                    owner = devices.get(nic.device)  # (completed by the NIC metering it, as update does)
                    placements[nic.device] = self._placed(nic.device, owner[1] if owner else nic)
        sourced: dict[int, list[Owned]] = {}
        for name, (domain, nic) in devices.items():
            index = self._source_of(nic)
            if index is not None:
                sourced.setdefault(index, []).append((name, domain, nic))
        # Matched by MAC (every link's MAC counts) or counted by a source: not updatable. NICs
        # whose target dev is no link and matched nothing are (an update looks at their MACs).
        unlinked = set(self._links.last_unlinked)  # (the plan's own: an update changes it)
        updatable = not self._links.last_matched and len(unlinked) == self._links.last_unresolved
        named = self._named(domains, devices) if updatable else None
        return PollPlan(
            generation=generation,
            links=stable,
            domains=domains,
            devices=devices,
            keys=keys,
            metered=metered,
            sourced=[(self._sources[i], sourced[i]) for i in sorted(sourced)],
            present=frozenset(keys.values()),
            placements=placements,
            ordered=ordered,
            named=named,
            remember=list(zip(metered, repeat(None))),
            touched=None,
            unlinked=unlinked,
        )

    def _named(self, domains: list[DomainInfo], devices: dict[str, Owner]) -> dict[str, list[Owner]] | None:
        """NIC device name -> the NICs naming it; None when a source counts any NIC."""
        named: dict[str, list[Owner]] = {}
        for domain in domains:
            for nic in domain.nics:
                if self._source_of(nic) is not None:
                    return None
                if nic.device:
                    owner = devices.get(nic.device)  # its tuple, when it claimed the link
                    if owner is None or owner[0] is not domain or owner[1] is not nic:
                        owner = (domain, nic)
                    named.setdefault(nic.device, []).append(owner)
        return named

    def update(
        self,
        plan: PollPlan,
        generation: int | None,
        stable: dict[str, int],
        domains: list[DomainInfo],
        changed: set[str] | None,
    ) -> PollPlan | None:
        """The plan for the new links and domains, `plan` updated for the names in `changed`
        (the links that came, went or moved since plan.generation, None: any) and for the
        domains that are new objects; None when that cannot be done exactly (build instead).
        `plan` is consumed: its dicts become the new plan's."""
        named = plan.named
        if named is None or changed is None or generation is None or plan.sourced:
            return None
        plan.named = plan.generation = None  # consumed: never kept nor updated again
        names = set(changed)
        # and whatever else the link maps say came, went or moved (none, as a rule: the
        # topology logs every change; a copy of the last map with those applied equals the
        # new one, so no pass over every link builds anything)
        before = plan.links
        expected = before.copy()
        for name in names:
            index = stable.get(name)
            if index is None:
                expected.pop(name, None)
            else:
                expected[name] = index
        if expected != stable:
            names.update(compress(stable, map(ne, stable.values(), map(before.get, stable))))
            names.update(before.keys() - stable.keys())
        touched: set[str] = set()
        ordered = plan.ordered
        if len(domains) != len(plan.domains) or not all(map(is_, domains, plan.domains)):
            old = {d.uuid: d for d in plan.domains}
            new = {d.uuid: d for d in domains}
            gone = list(compress(old.values(), map(is_not, old.values(), map(new.get, old))))
            came = list(compress(new.values(), map(is_not, new.values(), map(old.get, new))))
            for domain in gone:
                touched.add(domain.uuid)
                for nic in domain.nics:
                    device = nic.device
                    owners = named.get(device) if device else None
                    if device and owners is not None:
                        owners[:] = [o for o in owners if o[0] is not domain]
                        if not owners:
                            del named[device]
                        names.add(device)
            for domain in came:
                touched.add(domain.uuid)
                active = domain.state not in INACTIVE_STATES
                for nic in domain.nics:
                    if self._source_of(nic) is not None:
                        return None  # counted by another source: rebuilt
                    if nic.device:
                        named.setdefault(nic.device, []).append((domain, nic))
                        names.add(nic.device)
                    elif active:
                        return None  # to be matched by MAC: rebuilt
            if old.keys() == new.keys():
                ordered = [new[d.uuid] for d in ordered]
            else:
                ordered = sorted(domains, key=_by_uuid)
        devices, keys, metered = plan.devices, plan.keys, plan.metered
        placements, by_ifindex, unlinked = plan.placements, plan.by_ifindex, plan.unlinked
        remember = []
        released = []
        dropped = set(filter(None, map(keys.get, names)))  # their keys leave `present`
        link_key, placement_of, completed = self._links.key, self._placement, self._completed
        for name in names:
            naming = named.get(name, _NO_OWNERS)
            if len(naming) > 1:
                return None  # claimed by the first in the inventory's order, the rest by MAC
            index = stable.get(name)
            # a shut-off domain's NIC meters nothing (as in MeteredLinks.resolve)
            owners = naming if not naming or naming[0][0].state not in INACTIVE_STATES else _NO_OWNERS
            if owners and index is None:
                unlinked.add(name)  # a running NIC without its link: looked for by MAC below
            else:
                unlinked.discard(name)
            was = metered.pop(name, None)
            if was is not None and by_ifindex is not None and by_ifindex.get(was.ifindex) is was:
                del by_ifindex[was.ifindex]
            if index is None:
                keys.pop(name, None)
            else:
                key = keys[name] = link_key(name, index)
                if naming:  # (a shut-off domain's NIC too: its inventory record has it, as build)
                    placement = placement_of(name)
                    if placement.bridge is None and completed is not None:  # (no call for a bridge's port)
                        placement = completed(placement, naming[0][1])
                    placements[name] = placement
                if owners:
                    owner = devices[name] = owners[0]
                    metered[name] = key
                    if by_ifindex is not None:
                        by_ifindex[key.ifindex] = key
                    remember.append((name, was))
                    touched.add(owner[0].uuid)
                    continue
            devices.pop(name, None)
            if not naming or index is None:
                placements.pop(name, None)
            if was is not None and was.ifindex == index:
                released.append(was)
            for domain, _nic in naming:
                touched.add(domain.uuid)
        if unlinked and self._links.any_by_mac((named[name][0][1] for name in unlinked), stable, devices):
            return None  # a link no NIC names has one's MAC: the build matches it
        self._links.trim(keys)
        # The set of every link's key, from the last one: one copy, which keeps the hashes it
        # holds. The keys dropped are in it and those added are not (a key holds its name):
        # toggling the keys in one set and not the other removes the ones and adds the others
        added = set(filter(None, map(keys.get, names)))
        present = plan.present.symmetric_difference(dropped ^ added)
        return PollPlan(
            generation=generation,
            links=stable,
            domains=domains,
            devices=devices,
            keys=keys,
            metered=metered,
            sourced=[],
            present=present,
            placements=placements,
            ordered=ordered,
            named=named,
            remember=remember,
            touched=touched,
            unlinked=unlinked,
            by_ifindex=by_ifindex,
            released=released,
        )


def _runs(rows: list[int]) -> list[slice] | None:
    """Ascending `rows` as slices of consecutive rows, or None when they come in several runs
    too short to pay (_ROWS_PER_RUN). Each run's end is found by bisection: rows[i] - i grows
    by each gap between rows and is the same along a run, so a few steps a run, none a row."""
    n = len(rows)
    runs: list[slice] = []
    start = 0
    while start < n:
        if runs and (len(runs) + 1) * _ROWS_PER_RUN > n:
            return None  # (a single run always pays)
        gap, low, high = rows[start] - start, start + 1, n
        while low < high:  # the first row after `start` at another gap
            middle = (low + high) // 2
            if rows[middle] - middle == gap:
                low = middle + 1
            else:
                high = middle
        runs.append(slice(rows[start], rows[low - 1] + 1))
        start = low
    return runs
