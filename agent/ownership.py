"""Whose each counter is, kept from poll to poll: the poll plan (the metered links, the domain
NICs they belong to, the counter table's rows), each counter's attribution (domain, NIC,
placement), the measure templates and steady encoder built from them, and when the inventory
goes out again. A part of Agent (kvmeter.agent.daemon), on the poll thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import compress, repeat
from operator import attrgetter, is_not, itemgetter, ne
from typing import Any, Protocol

from kvmeter.agent.config import AgentConfig
from kvmeter.agent.counters import CounterTable, Stats
from kvmeter.agent.delta import DeltaEngine
from kvmeter.agent.inventory_records import InventoryRecords
from kvmeter.agent.measures import Attribution, Templates
from kvmeter.agent.metered import link_mac
from kvmeter.agent.metrics import AgentMetrics
from kvmeter.agent.model import CounterKey, DomainInfo, LinkPlacement, NicInfo
from kvmeter.agent.nic_placement import NicPlacements
from kvmeter.agent.plan import Owner, Planner, PollPlan
from kvmeter.agent.sources import CounterSource
from kvmeter.agent.traffic import TrafficRules
from kvmeter.agent.unmetered import UnmeteredNics
from kvmeter.agent.wire import SteadyEncoder


# What the agent needs of its inventory (libvirt's) and topology (netlink's); tests pass doubles.
class InventoryLike(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def snapshot(self) -> Mapping[str, DomainInfo]: ...
    def interface_stats(self, uuid: str, device: str, timeout: float = 2.0) -> Stats | None: ...


class TopologyLike(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def placement(self, ifname: str) -> LinkPlacement: ...
    def links(self) -> dict[str, int]: ...
    def add_listener(self, callback: Callable[[Any], None]) -> None: ...
    def set_rules(self, rules: TrafficRules) -> None: ...


_NO_PAIR = (None,)  # a template pair's stand-in, built for no attribution
_who_of = itemgetter(0)
_NAME = attrgetter("name")


class Ownership:
    """Agent's bookkeeping of whose each counter is (see the module's docstring)."""

    config: AgentConfig
    inventory: InventoryLike
    topology: TopologyLike
    engine: DeltaEngine
    _sources: Sequence[CounterSource]
    _planner: Planner
    _nic_placements: NicPlacements  # a link's placement completed by its NIC's (Open vSwitch)
    _plan: PollPlan | None
    _attribution: dict[CounterKey, Attribution]
    # Counters whose NIC changed while their link stayed (a pre-created tap that outlived its VM,
    # unplugged or given to another VM): the poll that first sees it reads them under the
    # attribution they had (their bytes since the last poll are its), then this one replaces it
    # (None: no NIC meters them, a later one counts from that reading)
    _handover: dict[CounterKey, Attribution | None]
    # The attributions a hand-over took from counters no NIC meters any more, kept for their
    # final counters should the link go before a NIC meters it again (that tail is theirs)
    _retired: dict[CounterKey, Attribution]
    _templates: Templates
    _gone: dict[str, CounterKey]  # name -> key of the links this poll's events deleted
    # The last steady encoder built and the counters it encodes: the next one follows from it
    _last_encoder: tuple[tuple[CounterKey, ...], SteadyEncoder] | None
    # Keys whose attribution was replaced or dropped since the last encoder was built (a
    # storm's new taps, as a rule): the last encoder's other counters keep their pairs as they are
    _reattributed: set[CounterKey]
    _inventory_records: InventoryRecords
    _inventory_plan: PollPlan | None  # the plan the records were last updated for
    _inventory_sent: int | None  # the records' version when the last spooled batch was made
    # Domains whose inventory record may have changed since the last update (None: any)
    _inventory_touched: set[str] | None
    _polls_since_inventory: int  # since the last batch that carried every record
    _unmetered: UnmeteredNics  # running domains' NICs no link or source counts: logged, a gauge
    metrics: AgentMetrics

    def _plan_for(self, generation: int | None, stable: dict[str, int]) -> PollPlan:
        domains = list(self.inventory.snapshot().values())
        plan = self._plan
        if plan is not None and plan.still_valid(generation, stable, domains):
            return plan
        new = None
        if plan is not None and plan.generation is not None and generation is not None:
            # Only what changed since the plan (a VM storm's taps) is derived again.
            changed_since = getattr(self.topology, "changed_since", None)
            changed = changed_since(plan.generation) if changed_since is not None else None
            new = self._planner.update(plan, generation, stable, domains, changed)
        if new is None:
            new = self._planner.build(generation, stable, domains)
        attribution, devices, placements = self._attribution, new.devices, new.placements
        released = new.released
        if new.touched is None and attribution:  # built: those no NIC meters any more, found
            released = [k for k in attribution.keys() - new.metered.values() if k in new.present]
        for key in released:
            if key in attribution:
                self._handover[key] = None
        for name, was in new.remember:  # one placement lookup per link, shared
            key, (domain, nic), placement = new.metered[name], devices[name], placements.get(name)
            last = attribution.get(was) if was is not None else None
            if last is not None and last.domain is domain and last.nic is nic and last.placement is placement:
                if attribution.get(key) is not last:
                    attribution[key] = last  # a tap made again for the same NIC: the same attribution
                    self._reattributed.add(key)
                elif self._handover:
                    self._handover.pop(key, None)  # its NIC again before the hand-over was spooled
            else:
                self._remember(key, domain, nic, placement)
        if new.touched is None:
            self._inventory_touched = None
        elif self._inventory_touched is not None:
            self._inventory_touched |= new.touched
        self._unmetered.update(new.domains, new.touched)
        self.metrics.unmetered_nics.set(self._unmetered.count)
        self._plan = new
        return new

    def _remember(
        self, key: CounterKey, domain: DomainInfo, nic: NicInfo, placement: LinkPlacement | None = None
    ) -> None:
        """Attribution for this poll; the same object while nothing changed (topology and
        inventory hand out the same objects until something changes), so measure templates hold.
        `placement`: the link's, when the caller has just looked it up."""
        if placement is not None:
            pass
        elif key.ifindex:
            placement = self._nic_placements(self.topology.placement(key.name), nic)
        else:  # counted without a host link (agent.sources): classify by what libvirt says
            traffic = self.config.traffic.classify(nic.bridge, nic.vlan_tag, None)
            placement = LinkPlacement(bridge=nic.bridge, vlan_id=nic.vlan_tag, traffic_type=traffic)
        known = self._attribution.get(key)
        if (
            known is None
            or known.domain is not domain
            or known.nic is not nic
            or (known.placement is not placement and known.placement != placement)
        ):
            who = Attribution(domain, nic, placement)
            if (
                known is not None
                and key.ifindex
                and (known.domain.uuid, known.nic.mac) != (domain.uuid, nic.mac)
                and not self.engine.untracked((key,))
            ):  # (a counter not read under its last attribution yet, a new tap's: the new one's now)
                self._handover[key] = who  # another NIC's from the next poll on (see _handover)
                return
            self._attribution[key] = who
            self._reattributed.add(key)
        elif self._handover:
            self._handover.pop(key, None)  # back to its NIC before the hand-over was spooled

    def _handed_over(self) -> None:
        """The poll that read the handed-over counters under their last attribution is spooled:
        the new one counts from here on."""
        if not self._handover:
            return
        for key, who in self._handover.items():
            if who is None:
                retired = self._attribution.pop(key, None)
                if retired is not None:
                    self._retired[key] = retired
            else:
                self._attribution[key] = who
            self._reattributed.add(key)
        self._handover = {}

    def _attribute_deleted(
        self,
        key: CounterKey,
        ifname: str,
        devices: Mapping[str, Owner],
        left: LinkPlacement | None = None,
        address: str | None = None,
    ) -> None:
        """A deleted link's counter without attribution, for its final counters: its NIC's, or
        the one a hand-over retired, or the NIC the inventory last saw running with a tap of
        that name and MAC. `left`: where the link sat until then; `address`: its MAC (its
        event's)."""
        owner = devices.get(ifname)
        if owner is None:
            if key not in self._retired:
                owner = self._gone_owner(ifname, address)
        elif address is not None and address.lower() != link_mac(owner[1]):
            # not the tap of the NIC now under its name (another VM's came after it): the NIC
            # it was, if the inventory saw it; else nobody's when libvirt made it (0xfe first:
            # another NIC's tap), the NIC now when not (a pre-created tap's own MAC, as before)
            gone = self._gone_owner(ifname, address)
            owner = gone if gone is not None or address.lower().startswith("fe:") else owner
        if owner is not None:
            # Placed where it sat, not where the link now under its name sits: a tap made since
            # the last poll and gone before it, its NIC re-plugged (libvirt's new tap takes its name)
            placement = self._nic_placements(left, owner[1]) if left is not None else None
            self._remember(key, *owner, placement)
        elif self._retired:
            who = self._retired.pop(key, None)
            if who is not None:
                self._attribution[key] = who
                self._reattributed.add(key)

    def _gone_owner(self, ifname: str, address: str | None) -> Owner | None:
        """The NIC a deleted link was the tap of though no link under its name is that NIC's by
        the poll (made and deleted between two polls: a VM started and stopped), as the
        inventory saw it while it ran, or sees it still (it has not heard the stop yet); only
        if the link's MAC is that NIC's (not another VM's tap under the name: vnetN names are
        reused)."""
        if address is None:
            return None
        last_owners = getattr(self.inventory, "last_owners", None)  # (a double may have none)
        if last_owners is None:
            return None
        mac = address.lower()
        owners: list[Owner] = last_owners(ifname)
        return next((owner for owner in owners if mac == link_mac(owner[1])), None)

    def _source_of(self, nic: NicInfo) -> int | None:
        """The index of the first source that claims the NIC, None for none."""
        for index, source in enumerate(self._sources):
            if source.claims(nic):
                return index
        return None

    def _claimed(self, nic: NicInfo) -> bool:
        return self._source_of(nic) is not None

    def _steady_encoder(self, plan: PollPlan) -> SteadyEncoder | None:
        """The plan's encoder of steady polls; None when a metered counter has no attribution.
        Built by C-level passes over the counters: only the pairs missing or built for another
        attribution (a storm's new taps) are made one by one."""
        if plan.encoder is None:
            keys = plan.row_keys
            encoder = self._encoder_after_last(plan, keys)
            if encoder is None:
                whos = list(map(self._attribution.get, keys))
                if not all(whos):
                    return None
                encoder = SteadyEncoder(self._pairs(keys, whos))
            plan.encoder = encoder
            self._last_encoder = (keys, encoder)
            self._reattributed = set()
        return plan.encoder

    def _pairs(self, keys: Sequence[CounterKey], whos: Sequence[Any]) -> list[Any]:
        """The template pairs of `keys` for `whos`: the cached ones by a C-level pass, only
        those missing or built for another attribution made one by one (a storm's new taps:
        from their previous incarnations' pairs)."""
        pairs: list[Any] = list(map(self._templates.cached, keys, repeat(_NO_PAIR)))
        missing = compress(range(len(pairs)), map(is_not, map(_who_of, pairs), whos))
        self._templates.fill(pairs, missing, keys, whos, self._gone)
        return pairs

    def _encoder_after_last(self, plan: PollPlan, keys: tuple[CounterKey, ...]) -> SteadyEncoder | None:
        """The last encoder followed by the new counters, when `keys` are the last encoder's
        counters still there, in their order and with the same attribution, then new ones (a
        VM storm's rows, in the order of their ifindexes: see PollPlan.rows_of), each
        attributed; else None. The attribution of those that stayed is looked at only when
        one of them was attributed again since (_reattributed)."""
        if self._last_encoder is None:
            return None
        last_keys, last = self._last_encoder
        kept: list[Any] = list(map(plan.present.__contains__, last_keys))
        stayed = tuple(compress(last_keys, kept))
        s = len(stayed)
        if tuple(keys[:s]) != stayed:
            return None
        attribution = self._attribution
        if (self._reattributed & plan.present).difference(keys[s:]) and any(
            map(is_not, map(_who_of, compress(last.pairs, kept)), map(attribution.get, stayed))
        ):
            return None
        whos = list(map(attribution.get, keys[s:]))
        if not all(whos):
            return None
        return last.followed_by(kept, self._pairs(keys[s:], whos))

    def _forget_closed(self, plan: PollPlan) -> None:
        """Drop the attribution of counters the engine no longer tracks, unless the plan still
        meters them (a reborn tap waiting for its old incarnation's close, for one)."""
        tracked = self.engine.tracked_count()
        attribution = self._attribution
        if len(attribution) > tracked:  # the links deleted by this poll's events first
            self._forget(self.engine.untracked(self._gone.values()) & attribution.keys(), plan.metered)
        if len(attribution) > tracked:  # forgotten by the engine, or a reborn tap waiting
            self._forget(attribution.keys() - self.engine.tracked_keys(), plan.metered)
        if self._retired:  # those the engine no longer tracks
            for key in self.engine.untracked(list(self._retired)):
                del self._retired[key]
        if len(self._templates) > 2 * tracked:
            self._templates.keep_only(self.engine.tracked_keys())
        if len(self._reattributed) > len(attribution) + 64:
            # no encoder built for long (NICs counted by another source): the next one is built
            # from its pairs, and what was attributed again since is no longer kept
            self._last_encoder, self._reattributed = None, set()

    def _forget(self, keys: Iterable[CounterKey], metered: Mapping[str, CounterKey]) -> None:
        """Drop the attribution of `keys` (attributed ones) but of those the plan meters, looked
        at by C-level passes (a storm closes a tenth of a host's counters)."""
        keys = list(keys)
        for key in compress(keys, map(ne, map(metered.get, map(_NAME, keys)), keys)):
            del self._attribution[key]
            self._reattributed.add(key)

    def _inventory_if_due(self, plan: PollPlan) -> tuple[bytes | None, tuple[int, int]]:
        """The inventory records this poll's batch carries, and what the agent has sent once the
        batch is spooled (for `_inventory_spooled`; a dry run or a failed poll takes nothing off
        the next batch). Every record on the first batch and every inventory_every polls
        (the collector's witness of the domains that did not change); between those, only the
        records written since the last batch that carried any (a VM storm's domains, not the
        host's). The records are looked at again only when the plan is not the one they were
        last updated for."""
        records = self._inventory_records
        if plan is not self._inventory_plan:
            records.update(plan.ordered, plan.placements, plan.links, touched=self._inventory_touched)
            self._inventory_touched = set()
            self._inventory_plan = plan
        polls = self._polls_since_inventory + 1
        if self._inventory_sent is None or polls >= self.config.inventory_every:
            return records.joined(), (records.version, 0)
        # None: nothing written since (or only dropped or moved)
        return records.since(self._inventory_sent) or None, (records.version, polls)

    def _inventory_spooled(self, sent: tuple[int, int]) -> None:
        """The batch carrying `_inventory_if_due`'s records is on disk: the version it sent and
        the polls since every record went."""
        self._inventory_sent, self._polls_since_inventory = sent


def released_readings(
    handover: Mapping[CounterKey, object], table: CounterTable, plan: PollPlan
) -> list[tuple[CounterKey, Stats]]:
    """The readings of the handed-over counters the plan no longer meters (a few, a poll now
    and then): their last bytes are read once more, under the attribution they had."""
    readings = []
    for key in sorted(handover):  # (in the order of their ifindexes, however they were found)
        if plan.metered.get(key.name) is not key and key in plan.present:
            try:
                if table.ifindexes is None:
                    i = table.names.index(key.name)
                else:
                    i = table.ifindexes.index(key.ifindex)
            except ValueError:
                continue  # gone from the table since the link map was read
            readings.append(
                (key, (table.rx_bytes[i], table.rx_packets[i], table.tx_bytes[i], table.tx_packets[i]))
            )
    return readings
