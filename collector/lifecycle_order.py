"""The order lifecycle events are applied in (lifecycle.py): by event time, ties and clock skew
settled so that the order depends on the set of events alone.

Order: by event time. Events of one time (CloudStack stamps whole seconds) are applied in a
state-aware order: at each step the first event, by (effect rank, category, event id), that
changes the current state; when none would, the rest in that order (they are no-ops). So a
stopped VM that STARTs and STOPs within one second ends stopped, a running one that STOPs and
STARTs (a restart) ends running, and an ownership move (VM.DESTROY for the old owner, VM.CREATE
for the new one) closes before it reopens. The effect rank (closers, then splitters, then
openers; usage before state events) only breaks ties between events that would all change
the state. The order depends on the set of events alone, so arrival order never matters.
Identical event ids are one event.

Clock skew (several management servers, each with its own clock, one bus): within one source
(a Kafka partition, a RabbitMQ stream, a file: events carry their place in the source's own
stored order, delivery_source / delivery_seq), an event delivered after another but stamped
earlier by at most MAX_SKEW_MS is applied after it: its order time is raised to the other's
(transitively, never by more than MAX_SKEW_MS), and among events of one order time one source's
events keep their delivery order. So the state after all events is the one the last delivered
event implies. Boundaries still use each event's own stamp, held to never run backwards per
segment kind: a segment never extends past a closer delivered after its opener (a STOP
stamped before its START closes it at zero length, dropped) and is never negative; an opener
stamped before the closer delivered ahead of it opens at that closer's time. A larger
inversion is a reordering, not skew: stamps decide. Across sources stamps decide. The order is
stored (offsets, lines), so replicas and replays agree; duplicates keep the first stored place.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator

from kvmeter.proto import pb

# The largest clock difference between management servers taken for skew: one source's events
# inverted by more than this are a reordering, and their stamps decide.
MAX_SKEW_MS = 60_000

RUNNING_STATE = "Running"
STOPPED_STATES = frozenset({"Stopped", "Destroyed", "Expunging", "Error", "Shutdown", "Shutdowned"})

# Effect rank, the tie-break among events of one time that would all change the state:
# closers (0) before splitters (1) before openers (2).
EFFECT_RANK = {
    "VM.STOP": 0,
    "VM.DESTROY": 0,
    "VM.EXPUNGE": 0,
    "NET.IPRELEASE": 0,
    "VM.UPGRADE": 1,
    "VM.DYNAMIC.SCALE": 1,
    "VM.CREATE": 2,
    "VM.START": 2,
    "NET.IPASSIGN": 2,
}
_CATEGORY_RANK = {pb.USAGE: 0, pb.RESOURCE_STATE: 1, pb.ACTION: 2, pb.ASYNC_JOB: 3}
_STATEFUL = frozenset({pb.USAGE, pb.RESOURCE_STATE})  # the categories that change segments


def event_order(event: pb.LifecycleEvent) -> tuple[int, int, int, str]:
    """Sort key: (time, effect rank, category rank, event id) — total and content-only."""
    if event.category == pb.RESOURCE_STATE:
        rank = 2 if event.attributes.get("new-state") == RUNNING_STATE else 0
    else:
        rank = EFFECT_RANK.get(event.event_type, 3)
    return (event.time, rank, _CATEGORY_RANK.get(event.category, 4), event.event_id)


def order_times(events: list[pb.LifecycleEvent]) -> dict[int, int]:
    """id(event) -> the time it is ordered by: its stamp, raised to the order time of any event
    of its source delivered before it whose order time is at most MAX_SKEW_MS later."""
    at = {id(ev): ev.time for ev in events}
    sources: dict[str, list[pb.LifecycleEvent]] = {}
    for ev in events:
        if ev.delivery_source:
            sources.setdefault(ev.delivery_source, []).append(ev)
    for delivered in sources.values():
        delivered.sort(key=lambda ev: (ev.delivery_seq, ev.event_id))
        seen: list[int] = []  # order times of the events delivered so far, sorted
        for ev in delivered:
            i = bisect.bisect_right(seen, ev.time + MAX_SKEW_MS)
            if i and seen[i - 1] > ev.time:
                at[id(ev)] = seen[i - 1]
            bisect.insort(seen, at[id(ev)])
    return at


def effect_order(
    would_change: Callable[[pb.LifecycleEvent], bool], ordered: list[pb.LifecycleEvent], at: dict[int, int]
) -> Iterator[pb.LifecycleEvent]:
    """The events (sorted by order time, then event_order) in the order to apply them; the
    caller applies each one before asking for the next. Within one order time: first the first
    event that changes the machine's current state, until none would; then the rest, no-ops, in
    order; an event waits for the events of its source delivered before it."""
    i, n = 0, len(ordered)
    while i < n:
        j = i + 1
        while j < n and at[id(ordered[j])] == at[id(ordered[i])]:
            j += 1
        if j - i == 1:
            yield ordered[i]
        else:
            pending = ordered[i:j]
            if not any(ev.category in _STATEFUL for ev in pending):
                yield from pending  # audit-only events (async jobs without a time): nothing to order
            else:
                yield from _in_effect_order(would_change, pending)
        i = j


def _in_effect_order(
    would_change: Callable[[pb.LifecycleEvent], bool], pending: list[pb.LifecycleEvent]
) -> Iterator[pb.LifecycleEvent]:
    """One order time's events: the first ready one that changes the state, else the first ready
    one, until none changes it and none waits: then the rest in order (no-ops). An event is ready
    when no event of its source delivered before it is pending."""
    waiting: dict[str, list[int]] = {}  # source -> delivery places still pending, sorted
    for ev in pending:
        if ev.delivery_source:
            bisect.insort(waiting.setdefault(ev.delivery_source, []), ev.delivery_seq)
    while pending:
        ready = [k for k, ev in enumerate(pending) if not ev.delivery_source or
                 waiting[ev.delivery_source][0] == ev.delivery_seq]  # fmt: skip
        pick = next((k for k in ready if would_change(pending[k])), None)
        if pick is None and len(ready) == len(pending):  # nothing left changes the state, none waits
            yield from pending
            return
        ev = pending.pop(ready[0] if pick is None else pick)
        if ev.delivery_source:
            waiting[ev.delivery_source].remove(ev.delivery_seq)
        yield ev
