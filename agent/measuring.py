"""What one poll reads and what the delta engine concludes from it: the link map and the
counter table read, the queued link events applied (births, deletions' final counters), the
counters the host cannot see read from their sources, and the engine run by columns, mixed or
by rows. A part of Agent (kvmeter.agent.daemon), on the poll thread; the engine stays pure:
the clocks are read here and the times passed in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import compress, repeat
from operator import attrgetter, eq, is_, is_not, itemgetter, not_

from kvmeter.agent.counters import CounterTable, KernelTable, Stats
from kvmeter.agent.delta_finals import FinalReading
from kvmeter.agent.link_moves import moved_from as _moved_from
from kvmeter.agent.link_moves import placed_as
from kvmeter.agent.linktable import LinkEvent
from kvmeter.agent.measures import Attribution
from kvmeter.agent.metered import MeteredLinks
from kvmeter.agent.metrics import AgentMetrics
from kvmeter.agent.model import (
    ColumnDeltas,
    CounterKey,
    CounterSample,
    Delta,
    DomainInfo,
    LinkPlacement,
    NicInfo,
)
from kvmeter.agent.ownership import Ownership, released_readings
from kvmeter.agent.plan import PollPlan
from kvmeter.agent.sources import CounterSource, Owned
from kvmeter.log_limit import limited_logger

log = logging.getLogger(__name__)
# Polls a new tap waits for libvirt to say whose it is (a minute at the default poll interval)
WAIT_POLLS = 6
# A NIC its source cannot read (libvirt away, ovs-vsctl failing) fails every poll: a line a minute
UNREAD_LOG = limited_logger("kvmeter.agent.sources.unread", 60.0)
_IFNAME = attrgetter("ifname")
_IFINDEX = attrgetter("ifindex")
_KIND = attrgetter("kind")
_NAME = attrgetter("name")
_STATS = attrgetter("stats")
_WALL_MS = attrgetter("wall_ms")
_MONO_MS = attrgetter("mono_ms")
_IN_TURN = frozenset(("rename", "move"))  # event kinds applied in turn, never all at once
_NOTHING_MOVED: Mapping[CounterKey, Attribution] = {}
_KEY_OF = itemgetter(0)  # of a (key, NIC) pair


@dataclass(frozen=True)
class StampedEvent:
    """A link event as the topology's thread handed it over, stamped with when it came."""

    kind: str
    ifname: str
    ifindex: int
    stats: Stats | None
    wall_ms: int
    mono_ms: int
    was: str | None = None  # a rename's previous name
    left: LinkPlacement | None = None  # a move's or del's: where the link sat until then
    address: str | None = None  # a del's: the link's MAC

    @classmethod
    def of(cls, event: LinkEvent, wall_ms: int, mono_ms: int) -> StampedEvent:
        return cls(
            event.kind,
            event.ifname,
            event.ifindex,
            event.stats,
            wall_ms,
            mono_ms,
            event.was,
            event.left,
            event.address,
        )


def _tail_lost(key: CounterKey) -> None:
    log.warning("%s (ifindex %d) deleted without final counters: its tail is lost", key.name, key.ifindex)


def to_ms(seconds: float) -> int:
    return int(seconds * 1000)


class Measuring(Ownership):
    """Agent's reading of one poll (see the module's docstring)."""

    boot_id: str
    metrics: AgentMetrics
    _links: MeteredLinks
    _table: KernelTable
    _wall: Callable[[], float]
    _mono: Callable[[], float]
    # New taps left unread (see _hold_unowned): the NIC that claims them, polls waited
    _waiting: dict[CounterKey, tuple[NicInfo, int]]
    _incarnations: dict[CounterKey, int]  # the domain id each NIC without a link was last read under
    # This poll's deltas of links up to their move off a bridge, each with the attribution it had
    _moved: list[tuple[Delta, Attribution]]

    def _measure(
        self, events: list[StampedEvent], *, final: bool = False
    ) -> tuple[PollPlan, int, ColumnDeltas | None, list[Delta]]:
        """Read the counters and run the engine: (plan, poll time, the deltas of the counters
        taken by columns or None, the deltas of those taken by rows)."""
        generation = getattr(self.topology, "generation", None)
        self._gone, self._moved = {}, []
        before = self.topology.links()
        table = self._table.read()
        if generation is not None and getattr(self.topology, "generation", None) == generation:
            after = before  # no link came, went or moved meanwhile: the same map, no copy
        else:
            after = self.topology.links()
        now_ms, mono_ms = to_ms(self._wall()), to_ms(self._mono())
        stable = (
            after
            if after is before or after == before
            else {name: i for name, i in after.items() if before.get(name) == i}
        )
        # The NICs that claimed the names of this poll's new links before it (the plan update
        # consumes the last plan's dicts)
        last = self._plan
        claimed = {e.ifname: last.devices.get(e.ifname) for e in events if e.kind == "new"} if last else {}
        # The attribution of the links that left their bridge, before the plan gives them their
        # new place: the bytes up to each move are the old one's
        any_move = bool(events) and "move" in map(_KIND, events)
        moved_from = _moved_from(events, self._attribution, self.boot_id) if any_move else _NOTHING_MOVED
        plan = self._plan_for(generation, stable)
        if claimed or self._waiting:
            self._hold_unowned(events, claimed, plan, final=final)
        keys, (rx_bytes, rx_packets, tx_bytes, tx_packets) = plan.columns_of(table)
        # A steady poll (no link events, every counter known and growing) runs by columns; the
        # rest by rows, where every rule of the engine and every kind of measure applies (a
        # hand-over's poll, rare, too: see Ownership._handover).
        handover = self._handover
        if not events and not plan.sourced and not handover and self._steady_encoder(plan) is not None:
            steady = self.engine.poll_columns(
                now_ms, mono_ms, keys, rx_bytes, rx_packets, tx_bytes, tx_packets, plan.present
            )
            if steady is not None:
                self.metrics.interfaces.set(len(keys))
                return plan, now_ms, steady, []
        deltas = self._apply_events(events, plan.devices, moved_from)
        # After link events (or a counter that wrapped, reset or jumped): the counters that
        # stayed steady still go by columns, only the others by rows.
        if not plan.sourced and not handover and self._steady_encoder(plan) is not None:
            mixed = self.engine.poll_mixed(
                now_ms,
                mono_ms,
                keys,
                rx_bytes,
                rx_packets,
                tx_bytes,
                tx_packets,
                plan.present,
                newborn_columns=True,
            )
            if mixed is not None:
                self.metrics.interfaces.set(len(keys))
                return plan, now_ms, mixed[0], deltas + mixed[1]
        readings: list[tuple[CounterKey, Stats]] = list(
            zip(keys, zip(rx_bytes, rx_packets, tx_bytes, tx_packets))
        )
        present = plan.present
        if plan.sourced:
            readings += self._sourced_readings(plan.sourced, table, plan.links)
            present = self._present_with_sourced(plan)
        if handover:
            readings += released_readings(handover, table, plan)
        self.metrics.interfaces.set(len(readings))
        deltas += self.engine.poll_readings(now_ms, mono_ms, readings, present)
        return plan, now_ms, None, deltas

    def _hold_unowned(
        self,
        events: list[StampedEvent],
        claimed: Mapping[str, tuple[DomainInfo, NicInfo] | None],
        plan: PollPlan,
        *,
        final: bool,
    ) -> None:
        """Leave unread the new taps the NIC that named them before claims still, whose MAC is
        not that NIC's: another VM's tap under a reused name (vnetN), made before libvirt told
        of the first VM's stop and the second's start. Each counts from zero once a NIC read
        since (the new VM's) claims it, or after WAIT_POLLS, or at the last poll: neither the
        first VM is billed the second's bytes nor is any byte lost."""
        waiting = self._waiting
        # The new links that the NIC which named them claims again (a storm's reborn taps:
        # every one), then their MACs in one call (one hold of the topology's lock)
        metered, devices = plan.metered, plan.devices
        again: list[tuple[CounterKey, NicInfo]] = []
        for event in events:
            was = claimed.get(event.ifname) if event.kind == "new" else None
            key = metered.get(event.ifname)
            if was is not None and key is not None and key.ifindex == event.ifindex:
                nic = devices[event.ifname][1]
                if nic is was[1]:
                    again.append((key, nic))
        if again:
            foreign = self._links.foreign
            for (key, nic), mac in zip(again, self._link_addresses(list(map(_KEY_OF, again)))):
                if foreign(key.name, key.ifindex, nic, mac):
                    waiting[key] = (nic, 0)
        held = []
        for key, (nic, polls) in list(waiting.items()):
            owner = plan.devices.get(key.name)
            if (
                final
                or polls >= WAIT_POLLS
                or plan.metered.get(key.name) is not key
                or owner is None
                or owner[1] is not nic
            ):
                del waiting[key]
            else:
                waiting[key] = (nic, polls + 1)
                held.append(key)
        if held:
            self.engine.hold(held)

    def _link_addresses(self, keys: list[CounterKey]) -> list[str | None]:
        """The MACs the links of `keys` carry, as the topology last heard (None: unknown)."""
        many = getattr(self.topology, "addresses", None)
        if many is not None:
            return many(keys)
        one = getattr(self.topology, "address", None)  # (a topology double may have neither)
        return [one(k.name, k.ifindex) if one is not None else None for k in keys]

    def _apply_events(
        self,
        events: list[StampedEvent],
        devices: Mapping[str, tuple[DomainInfo, NicInfo]],
        moved_from: Mapping[CounterKey, Attribution],
    ) -> list[Delta]:
        """Link events in the order they came: births for the engine, deletions' final counters,
        moves' readings (into `_moved`, each with its attribution in `moved_from`). Births and
        final counters go to the engine together (a VM storm's finals: by columns), up to an
        event on a key among them: events of distinct keys commute."""
        # The object the plan holds for each link (the engine's and attribution's key): lookups
        # by identity, no key made per event
        keys = self._links.keys_of(map(_IFNAME, events), map(_IFINDEX, events))
        if len(set(keys)) == len(keys) and not _IN_TURN.intersection(map(_KIND, events)):
            return self._apply_distinct(events, keys, devices)
        return self._apply_in_turn(events, keys, devices, moved_from)

    def _apply_in_turn(
        self,
        events: list[StampedEvent],
        keys: list[CounterKey],
        devices: Mapping[str, tuple[DomainInfo, NicInfo]],
        moved_from: Mapping[CounterKey, Attribution] = _NOTHING_MOVED,
    ) -> list[Delta]:
        born: list[CounterKey] = []
        finals: list[FinalReading] = []
        deltas: list[Delta] = []
        pending: set[CounterKey] = set()
        # The links this poll's events moved already, each with the attribution its bytes are placed from
        moved: dict[CounterKey, Attribution] = {}
        gone = self._gone
        attribution = self._attribution
        for event, key in zip(events, keys):
            if key in pending:  # the same key again: what came before it first
                self.engine.links_created(born)
                deltas += self.engine.finals(finals)
                born, finals, pending = [], [], set()
            pending.add(key)
            kind = event.kind
            if event.was is not None:
                # the same link under a new name (a move's too): its counter goes on, never counted again
                self.engine.links_created(born)
                deltas += self.engine.finals(finals)
                born, finals, pending = [], [], {key}
                self.engine.renamed(self._links.key(event.was, event.ifindex), key)
            if kind == "new":
                born.append(key)
            elif kind == "move" and event.stats is not None and (key in moved_from or key in attribution):
                # the link left its bridge: its bytes until then are billed as that place's (one
                # born since the last poll: its owner's as this poll found it, from zero)
                rx_bytes, rx_packets, tx_bytes, tx_packets = event.stats
                sample = CounterSample(key, rx_bytes, tx_bytes, rx_packets, tx_packets)
                delta = self.engine.moved(event.wall_ms, event.mono_ms, sample)
                base = moved_from.get(key) or attribution[key]
                who = base if key in moved_from and key not in moved else placed_as(base, event.left)
                moved[key] = base
                if delta is not None:
                    self._moved.append((delta, who))
            elif kind == "del":
                gone[key.name] = key
                if event.stats is None:
                    _tail_lost(key)
                    continue
                if key in moved:  # its bytes since its move: where that took it, not the last poll's place
                    who = placed_as(moved[key], event.left)
                    last = (event.wall_ms, event.mono_ms, key, event.stats)
                    self._moved.extend((delta, who) for delta in self.engine.finals([last]))
                    continue
                if key not in attribution:
                    self._attribute_deleted(key, event.ifname, devices, event.left, event.address)
                finals.append((event.wall_ms, event.mono_ms, key, event.stats))
        self.engine.links_created(born)
        if finals:
            deltas += self.engine.finals(finals)
        return deltas

    def _apply_distinct(
        self,
        events: list[StampedEvent],
        keys: list[CounterKey],
        devices: Mapping[str, tuple[DomainInfo, NicInfo]],
    ) -> list[Delta]:
        """_apply_in_turn for events on distinct keys (a storm's: one deletion and one birth per
        tap), by C-level passes: every birth and every final counter goes at once."""
        kinds = list(map(_KIND, events))
        self.engine.links_created(compress(keys, map(eq, kinds, repeat("new"))))
        deleted = list(map(eq, kinds, repeat("del")))
        if not any(deleted):
            return []
        keys = list(compress(keys, deleted))
        events = list(compress(events, deleted))
        self._gone.update(zip(map(_NAME, keys), keys))
        stats = list(map(_STATS, events))
        if None in stats:
            for i in compress(range(len(stats)), map(is_, stats, repeat(None))):
                _tail_lost(keys[i])
            kept = list(map(is_not, stats, repeat(None)))
            keys, events, stats = (list(compress(c, kept)) for c in (keys, events, stats))
        attribution = self._attribution
        for i in compress(range(len(keys)), map(not_, map(attribution.__contains__, keys))):
            event = events[i]
            self._attribute_deleted(keys[i], event.ifname, devices, event.left, event.address)
        return self.engine.finals(list(zip(map(_WALL_MS, events), map(_MONO_MS, events), keys, stats)))

    def _present_with_sourced(self, plan: PollPlan) -> frozenset[CounterKey]:
        """The plan's link keys and those of the NICs its sources count, for the engine: such a
        counter has no link to say it is still there, so one its source could not read for a few
        polls (libvirt restarting, ovs-vsctl slow) would be forgotten, and its next reading,
        the NIC's whole count, billed again from zero; and one not read at a fresh start would
        not be baselined."""
        if plan.sourced_present is None:
            names = [name for _source, nics in plan.sourced for name, _domain, _nic in nics]
            plan.sourced_present = plan.present.union(CounterKey(self.boot_id, 0, name) for name in names)
        return plan.sourced_present

    def _sourced_readings(
        self,
        sourced: list[tuple[CounterSource, list[Owned]]],
        table: CounterTable,
        links: Mapping[str, int],
    ) -> list[tuple[CounterKey, Stats]]:
        """NICs the host cannot see, each from its source; one the kernel's table holds after
        all is counted there."""
        readings = []
        if table.ifindexes is None:
            host_visible = set(table.names)
        else:
            counted = set(table.ifindexes)
            host_visible = {name for name, index in links.items() if index in counted}
        for source, nics in sourced:
            wanted = {name: (domain, nic) for name, domain, nic in nics if name not in host_visible}
            if not wanted:
                continue
            got = source.read([(name, domain, nic) for name, (domain, nic) in wanted.items()]).as_dict()
            if len(got) < len(wanted):  # their bytes wait for a later reading (kept: see above)
                unread = sorted(wanted.keys() - got.keys())
                UNREAD_LOG.warning("no counters read for %d NIC(s) without a host link: %s", len(unread),
                                   ", ".join(f"{n} of {wanted[n][0].name}" for n in unread[:10]))  # fmt: skip
            for name, stats in got.items():
                owner = wanted.get(name)
                if owner is None:
                    continue
                key = CounterKey(self.boot_id, 0, name)  # no kernel ifindex: identity by name per boot
                # The name alone does not tell a VM that left and came back (a migration
                # back, a stop and start) within a few polls: its new QEMU counts from zero,
                # and what it moved is not what the old one's counters had grown to
                domain_id = owner[0].domain_id
                if domain_id is not None and self._incarnations.get(key, domain_id) != domain_id:
                    self.engine.restarted(key)
                if domain_id is not None:
                    self._incarnations[key] = domain_id
                readings.append((key, stats))
                self._remember(key, *owner)
        if len(self._incarnations) > 2 * len(readings) + 64:
            tracked = self.engine.tracked_keys()
            self._incarnations = {k: v for k, v in self._incarnations.items() if k in tracked}
        return readings
