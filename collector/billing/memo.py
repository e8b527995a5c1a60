"""Rated months kept between ratings, so usage already rated is not rated again.

An account's month is rated item after item in month order, and an item's cost depends only on
the items before it (the tier counters and the running total). So the memo keeps, per account
and month, the last rating (its items and their costs) and the rater's state every CHECKPOINT
items; rating the same month again under an equal tariff and equal facts rates only from the
first item that differs (the open window's record grown, a new window, a late record, an
adjustment), resumed from the checkpoint before it. The result is exactly that of rating from
scratch (tests/unit/test_billing_memo.py compares them under random changes).

Bounded: the least recently rated months are dropped past `max_items` items in all.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from kvmeter.collector.billing.money import ZERO, Scaled
from kvmeter.collector.billing.rating import Facts, Item, RatedItem, Rater
from kvmeter.collector.billing.tariff import Tariff

CHECKPOINT = 128  # items between two saved rater states: the most re-rated before a change


_State = tuple[dict[tuple[int, str, str], int], Scaled]  # a rater's tier counters and running total


@dataclass(frozen=True)
class _Month:
    tariff: Tariff
    facts: Facts
    items: list[Item]  # month order
    rated: list[RatedItem]
    states: list[_State]  # the rater's before item i * checkpoint
    end: _State  # and after the last item


class RatingMemo:
    """Thread-safe: entries are never changed, only replaced."""

    def __init__(self, max_items: int = 100_000, checkpoint: int = CHECKPOINT):
        self.max_items = max_items
        self.checkpoint = checkpoint
        self._months: OrderedDict[tuple[str, int], _Month] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()
        self.rated_items = 0  # items rated, and items whose rating was reused (for tests, bench)
        self.reused_items = 0

    @property
    def held_items(self) -> int:
        return self._held

    def rate(
        self, account: str, start_ms: int, ordered: list[Item], tariff: Tariff, facts: Facts
    ) -> tuple[list[RatedItem], Rater]:
        """`ordered` (an account's real items of the month starting at start_ms, in month
        order) rated, and the rater after them (to rate the projection next)."""
        key, step = (account, start_ms), self.checkpoint
        with self._lock:
            last = self._months.get(key)
        rated: list[RatedItem] = []
        states: list[_State] = [({}, ZERO)]
        rater = Rater(tariff, facts)
        if last is not None and _same(last.tariff, tariff) and _same(last.facts, facts):
            kept = _common_prefix(last.items, ordered)
            if kept == len(ordered) == len(last.items):  # nothing changed
                with self._lock:
                    self.reused_items += kept
                    if key in self._months:
                        self._months.move_to_end(key)
                return last.rated, Rater(tariff, facts, dict(last.end[0]), last.end[1])
            resume = min(kept // step, len(last.states) - 1)
            if resume:
                counters, total = last.states[resume]
                rated, states = last.rated[: resume * step], last.states[: resume + 1]
                rater = Rater(tariff, facts, dict(counters), total)
        start = len(rated)
        for i in range(start, len(ordered), step):
            if i > start:
                states.append((dict(rater.counters), rater.total))
            rated += rater.rate(ordered[i : i + step])
        month = _Month(tariff, facts, ordered, rated, states, (dict(rater.counters), rater.total))
        with self._lock:
            self.rated_items += len(ordered) - start
            self.reused_items += start
            old = self._months.pop(key, None)
            self._held += len(ordered) - (len(old.items) if old is not None else 0)
            self._months[key] = month
            while self._held > self.max_items and len(self._months) > 1:
                _, dropped = self._months.popitem(last=False)
                self._held -= len(dropped.items)
        return rated, Rater(tariff, facts, dict(rater.counters), rater.total)


def _same(a: object, b: object) -> bool:
    return a is b or a == b


def _common_prefix(old: list[Item], new: list[Item]) -> int:
    if old == new:
        return len(new)
    n = min(len(old), len(new))
    if old[:n] == new[:n]:  # one grew at the end: compared in C
        return n
    for i in range(n):
        if old[i] != new[i]:
            return i
    return n
