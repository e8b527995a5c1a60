"""Rated months kept between ratings, so usage already rated is not rated again.

An account's month is rated item after item in month order, and an item's cost depends only on
the items before it (the tier counters and the running total). So the memo keeps, per account
and month, the last rating (its items and their costs) and the rater's state every CHECKPOINT
items; rating the same month again under an equal tariff and equal facts rates only from the
first item that differs (the open window's record grown, a new window, a late record, an
adjustment), resumed from the checkpoint before it. The result is exactly that of rating from
scratch (tests/unit/test_billing_memo.py compares them under random changes).

Bounded: the least recently rated months are dropped past `max_items` items in all.

Kept as plain tuples of numbers and strings, not as the Items and RatedItems themselves: CPython's
collector stops tracking such a tuple once it has seen it (never a NamedTuple), so a full memo
adds nothing to the time of each full collection (with the NamedTuples, 300,000 tracked objects
at 20 rated months made each full collection 74 ms, a pause felt by the request that hit it).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from decimal import Decimal

from kvmeter.collector.billing.money import ZERO, Scaled
from kvmeter.collector.billing.rating import Facts, Item, RatedItem, Rater
from kvmeter.collector.billing.tariff import Tariff

CHECKPOINT = 128  # items between two saved rater states: the most re-rated before a change


_State = tuple[dict[tuple[int, str, str], int], Scaled]  # a rater's tier counters and running total
_Plain = tuple[tuple[object, ...], int, str, int, int]  # an Item as plain tuples
_Rating = tuple[Decimal, Scaled, int, str, tuple[str, ...]]  # a RatedItem without its item


@dataclass(frozen=True)
class _Month:
    tariff: Tariff
    facts: Facts
    items: list[_Plain]  # month order
    rated: list[_Rating]
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
        kept_items: list[_Plain] = []
        kept_ratings: list[_Rating] = []
        if last is not None and _same(last.tariff, tariff) and _same(last.facts, facts):
            kept = _common_prefix(last.items, ordered)  # (an Item equals its plain tuple)
            if kept == len(ordered) == len(last.items):  # nothing changed
                with self._lock:
                    self.reused_items += kept
                    if key in self._months:
                        self._months.move_to_end(key)
                return _rated(ordered, last.rated), Rater(tariff, facts, dict(last.end[0]), last.end[1])
            resume = min(kept // step, len(last.states) - 1)
            if resume:
                counters, total = last.states[resume]
                kept_ratings, states = last.rated[: resume * step], last.states[: resume + 1]
                kept_items, rated = last.items[: resume * step], _rated(ordered, kept_ratings)
                rater = Rater(tariff, facts, dict(counters), total)
        start = len(rated)
        for i in range(start, len(ordered), step):
            if i > start:
                states.append((dict(rater.counters), rater.total))
            rated += rater.rate(ordered[i : i + step])
        plain = kept_items + [(tuple(i.key), *i[1:]) for i in ordered[start:]]
        ratings = kept_ratings + [r[1:] for r in rated[start:]]
        month = _Month(tariff, facts, plain, ratings, states, (dict(rater.counters), rater.total))
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


def _rated(ordered: list[Item], ratings: list[_Rating]) -> list[RatedItem]:
    """The RatedItems of the first len(ratings) items, from their kept ratings."""
    return [RatedItem(item, *rating) for item, rating in zip(ordered[: len(ratings)], ratings, strict=True)]


def _same(a: object, b: object) -> bool:
    return a is b or a == b


def _common_prefix(old: list[_Plain], new: list[Item]) -> int:
    if old == new:
        return len(new)
    n = min(len(old), len(new))
    if old[:n] == new[:n]:  # one grew at the end: compared in C
        return n
    for i in range(n):
        if old[i] != new[i]:
            return i
    return n
