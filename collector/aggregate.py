"""Bytes summed per usage key in memory, before the store sees them: the collector's hot loop.
Pure: no I/O, no clock.

    Tally(window_ms, billable, owner_at, history=None, routes=None)   # one per transaction
    Tally.add_batch(batch: DecodedBatch) -> None          # the common path, over the columns
    Tally.add(measure: Measure) -> None                   # any one measure
    Tally.result() -> Attributed

A measure inside one window (nearly all: a poll interval is seconds) of a VM whose history names
one owner (ResourceHistory.owner_at: that owner at every instant) and has it running since before
the measure (attribution.running_since) is summed under (window start, route), a route being one
(owner, usage type, resource, traffic type, domain name) made once per distinct Target; a batch
whose measures share one interval (one poll) checks its window once. Every other measure (no
steady owner, a VM not running then, spanning windows, quarantined) becomes a Measure and goes
through the core's rules: OwnerIndex.owner_at, usage.byte_increments and its exact split. Sums
keep the order of first appearance, so a record's resource name is that of its first measure
whichever path it took. tests/unit/test_aggregate.py holds the paths equal.
Traffic the operator does not bill is summed the same way, apart (unbilled): every byte counts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from kvmeter.collector import usage
from kvmeter.collector.attribution import NO_DOUBT, is_router, running_since
from kvmeter.collector.decode import DecodedBatch, Target
from kvmeter.collector.model import Measure, ResourceHistory, UsageKey

_TYPE_OF = {"sent": usage.byte_usage_type("sent"), "received": usage.byte_usage_type("received")}


@dataclass
class Attributed:
    """Measures sorted out in memory: bytes per record key (billed and not billable), the
    measures to park (owner unknown) and to quarantine."""

    billed: dict[UsageKey, int] = field(default_factory=dict)
    names: dict[UsageKey, tuple[str, str]] = field(default_factory=dict)  # (resource name, device type)
    unbilled: dict[UsageKey, int] = field(default_factory=dict)
    parked: list[Measure] = field(default_factory=list)
    quarantined: list[Measure] = field(default_factory=list)
    measures: int = 0
    billed_bytes: int = 0


@dataclass(eq=False, slots=True)
class Route:
    """A usage key without its window; compared by identity (one object per distinct value).
    Kept from chunk to chunk, it also keeps the UsageKey of its latest window."""

    owner: str
    usage_type: int
    resource: str
    detail: str
    name: str  # domain name of the measure that made it: the record's resource name
    billed: bool
    about: tuple[str, str] = ("", "")  # (resource name, device type) of a billed record
    since: int = NO_DOUBT  # a measure starting earlier takes the core's rules (running_since)
    _key: UsageKey | None = None

    def key(self, ws: int, we: int) -> UsageKey:
        key = self._key
        if key is None or key.window_start_ms != ws or key.window_end_ms != we:
            key = self._key = UsageKey(self.owner, self.usage_type, self.resource, "", self.detail, ws, we)
        return key


def _no_history(_uuid: str) -> ResourceHistory | None:
    return None


class Tally:
    def __init__(
        self,
        window_ms: int,
        billable: frozenset[str],
        owner_at: Callable[[Measure], str | None],
        history: Callable[[str], ResourceHistory | None] = _no_history,
        routes: dict[Target, Route | None] | None = None,
    ):
        """`routes` may be kept from one Tally to the next while the histories stay the same
        (the caller's to know): a route depends on nothing else."""
        self.window_ms = window_ms
        self.billable = billable
        self.owner_at = owner_at
        self.history = history
        # instance uuid -> (its only owner, running_since), or None
        self._steady: dict[str, tuple[str, int] | None] = {}
        self._routes: dict[tuple[str, int, str, str, str], Route] = {}
        self._by_target = {} if routes is None else routes  # None: no steady owner, per measure
        # window start -> route -> bytes; a key's routes are all in one bucket, in order of appearance
        self._sums: dict[int, dict[Route, int]] = {}
        self._result = Attributed()

    def add_batch(self, batch: DecodedBatch) -> None:
        window, by_target, quarantined = self.window_ms, self._by_target, batch.quarantined
        self._result.measures += len(batch.targets)
        if batch.interval is not None:  # one poll: one window start and one check for all
            start, end = batch.interval
            ws = start - start % window
            if end - ws <= window:
                bucket = self._bucket(ws)
                for i, target, amount in zip(
                    range(len(batch.targets)), batch.targets, batch.amounts, strict=True
                ):
                    route = by_target.get(target, _UNSEEN)
                    if route is _UNSEEN:
                        route = by_target[target] = self._route_of(target)
                    if route is not None and start >= route.since and not (quarantined and i in quarantined):
                        bucket[route] = bucket.get(route, 0) + amount
                    else:
                        self._add(batch.measure(i))
                return
        columns = (batch.targets, batch.starts, batch.ends, batch.amounts)
        for i, target, start, end, amount in zip(range(len(batch.targets)), *columns, strict=True):
            route = by_target.get(target, _UNSEEN)
            if route is _UNSEEN:
                route = by_target[target] = self._route_of(target)
            ws = start - start % window
            if (
                route is not None
                and end - ws <= window
                and start >= route.since
                and not (quarantined and i in quarantined)
            ):
                bucket = self._bucket(ws)
                bucket[route] = bucket.get(route, 0) + amount
            else:
                self._add(batch.measure(i))

    def _bucket(self, ws: int) -> dict[Route, int]:
        bucket = self._sums.get(ws)
        if bucket is None:
            bucket = self._sums[ws] = {}
        return bucket

    def add(self, measure: Measure) -> None:
        self._result.measures += 1
        self._add(measure)

    def _add(self, m: Measure) -> None:
        """The core's rules for one measure."""
        if m.quarantine_reason:
            self._result.quarantined.append(m)
            return
        steady = self._steady_owner(m.instance_uuid) if m.instance_uuid else None
        owner = steady[0] if steady is not None and m.start_ms >= steady[1] else self.owner_at(m)
        if owner is None:
            self._result.parked.append(m)
            return
        window = self.window_ms
        start, end = m.start_ms, m.end_ms
        ws = start - start % window
        if end - ws <= window and m.direction in _TYPE_OF:
            resource = m.instance_uuid or m.domain_name or m.address
            route = self._route(owner, _TYPE_OF[m.direction], resource, m.traffic_type, m.domain_name)
            bucket = self._bucket(ws)
            bucket[route] = bucket.get(route, 0) + m.bytes
            return
        rules = self.billable if m.traffic_type in self.billable else frozenset((m.traffic_type,))
        for inc in usage.byte_increments(m, owner, window, rules):
            k = inc.key
            route = self._route(k.account, k.usage_type, k.resource, k.detail, m.domain_name)
            bucket = self._bucket(k.window_start_ms)
            bucket[route] = bucket.get(route, 0) + inc.bytes

    def _steady_owner(self, uuid: str) -> tuple[str, int] | None:
        if uuid not in self._steady:
            h = self.history(uuid)
            one = h.owners[0].account if h is not None and len(h.owners) == 1 else ""
            # "" names no owner: the index looks further
            self._steady[uuid] = (one, running_since(h)) if h is not None and one else None
        return self._steady[uuid]

    def _route_of(self, target: Target) -> Route | None:
        uuid = target.instance_uuid
        steady = self._steady_owner(uuid) if uuid else None
        if steady is None or target.direction not in _TYPE_OF:
            return None
        owner, since = steady
        route = self._route(owner, _TYPE_OF[target.direction], uuid, target.traffic_type, target.domain_name)
        route.since = since
        return route

    def _route(self, owner: str, usage_type: int, resource: str, detail: str, name: str) -> Route:
        ident = (owner, usage_type, resource, detail, name)
        route = self._routes.get(ident)
        if route is None:
            kind = "DomainRouter" if is_router(name) else "UserVm"
            route = self._routes[ident] = Route(*ident, billed=detail in self.billable, about=(name, kind))
        return route

    def result(self) -> Attributed:
        """Sums per UsageKey; names and device types of billed records."""
        result, window = self._result, self.window_ms
        for ws, bucket in self._sums.items():
            we = ws + window
            for route, amount in bucket.items():
                key = route.key(ws, we)
                if not route.billed:
                    result.unbilled[key] = result.unbilled.get(key, 0) + amount
                    continue
                result.billed[key] = result.billed.get(key, 0) + amount
                result.billed_bytes += amount
                if key not in result.names:
                    result.names[key] = route.about
        self._sums = {}
        return result


_UNSEEN = Route("", 0, "", "", "", billed=False)  # by_target's "not looked at yet"
