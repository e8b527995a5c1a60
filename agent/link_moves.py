"""Whose bytes, and typed as where, a link moved off its bridge between two polls had (a part
of Measuring, pure): up to each move, the place it left; after its last move, up to its
deletion before the next poll, the place that move took it to. Each link message's counters
bound the bytes before it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Protocol

from kvmeter.agent.measures import Attribution
from kvmeter.agent.model import CounterKey, LinkPlacement


class LinkChange(Protocol):
    """What of a link event (Measuring's StampedEvent) the moves are found by."""

    @property
    def kind(self) -> str: ...
    @property
    def ifname(self) -> str: ...
    @property
    def ifindex(self) -> int: ...
    @property
    def was(self) -> str | None: ...


def moved_from(
    events: Iterable[LinkChange], attribution: Mapping[CounterKey, Attribution], boot_id: str
) -> dict[CounterKey, Attribution]:
    """The attribution each link that `events` move off its bridge had at the last poll, by
    its key at the move (one renamed before: found under the name that poll knew)."""
    polled_as: dict[tuple[int, str], str] = {}  # renamed links: (ifindex, name) -> last poll's name
    moved: dict[CounterKey, Attribution] = {}
    for e in events:
        if e.was is not None:
            polled_as[e.ifindex, e.ifname] = polled_as.pop((e.ifindex, e.was), e.was)
        elif e.kind == "del":
            polled_as.pop((e.ifindex, e.ifname), None)  # (a link made again under that name)
        if e.kind == "move":
            then = polled_as.get((e.ifindex, e.ifname), e.ifname)
            who = attribution.get(CounterKey(boot_id, e.ifindex, then))
            if who is not None:
                moved[CounterKey(boot_id, e.ifindex, e.ifname)] = who
    return moved


def placed_as(who: Attribution, place: LinkPlacement | None) -> Attribution:
    """`who` with the place a link left, as its event says, for the bytes before that event of
    a link moved already since the last poll (it leaves where its last move took it, not where
    the last poll saw it). An Open vSwitch port (placed by libvirt's XML, no bridge in the
    kernel's view) stays as it was."""
    if place is None or place.bridge is None:
        return who
    return replace(who, placement=place)
