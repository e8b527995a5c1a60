"""Rating: an account's month of usage items -> the cost of each, under a tariff. Pure.

An item is a usage record (its recorded quantity), an adjustment (its delta) or a projected
quantity, in the month's order: records by window, adjustments by when they were made, the
projection last. Each item's window is cut where the rate in force changes (a price change inside
a window splits the window's quantity in proportion to time, as a measure spanning windows is
split); bytes climb the account's monthly tiers in that order, so a tier boundary crossed inside a
window prices the bytes below it at one price and the rest at the next.

Amounts stay exact (money.Scaled) and only the account's running total is rounded
(money.rounded): an item's cost is the step it makes in the rounded total.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import NamedTuple

from kvmeter.collector.billing.money import HOUR_MS, MIB_PER_GIB, ZERO, Scaled, exact, rounded, rounded_here
from kvmeter.collector.billing.tariff import BYTE_TYPES, Rate, Tariff
from kvmeter.collector.model import USAGE_TYPE_NAMES, UsageKey
from kvmeter.collector.vm_size import parse_size

RECORD, ADJUSTMENT, PROJECTION = "record", "adjustment", "projection"
_KIND_ORDER = {RECORD: 0, ADJUSTMENT: 1, PROJECTION: 2}


class Item(NamedTuple):
    """A quantity to rate: ms for time types, bytes for byte types (negative: an adjustment
    that takes some back). at_ms and ident place it in the month's order."""

    key: UsageKey
    quantity: int
    kind: str = RECORD
    at_ms: int = 0
    ident: int = 0


def month_order(item: Item) -> tuple[bool, int, int, int, UsageKey]:
    """Projected items after every real one; the rest by time, records before adjustments."""
    return (item.kind == PROJECTION, item.at_ms, _KIND_ORDER[item.kind], item.ident, item.key)


@dataclass(frozen=True)
class Facts:
    """What rating needs beyond the record: a resource's zone, a VM's vCPUs and memory (MiB).
    A VM's size comes from its offering (CloudStack's API) first, then from the VM itself."""

    zones: Mapping[str, str] = field(default_factory=dict)  # resource uuid (lower case) -> zone uuid
    vm_sizes: Mapping[str, tuple[int | None, int | None]] = field(default_factory=dict)  # by VM uuid
    offering_sizes: Mapping[str, tuple[int | None, int | None]] = field(default_factory=dict)

    def zone(self, resource: str) -> str:
        return self.zones.get(resource.lower(), "")

    def size(self, resource: str, offering: str) -> tuple[int, int] | None:
        """(vCPUs, memory MiB), None when either is unknown."""
        cpu, memory = self.offering_sizes.get(offering, (None, None))
        vm_cpu, vm_memory = self.vm_sizes.get(resource.lower(), (None, None))
        cpu, memory = cpu if cpu is not None else vm_cpu, memory if memory is not None else vm_memory
        return None if cpu is None or memory is None else (cpu, memory)


class RatedItem(NamedTuple):
    """An item and its cost (a NamedTuple: one is built per record of the month)."""

    item: Item
    cost: Decimal  # this item's step in the account's rounded running total
    amount: Scaled  # exact, before rounding
    unpriced: int = 0  # of its quantity, what no rate covers (see reason)
    reason: str = ""
    rates: tuple[str, ...] = ()  # the rates used, by where they are in the tariff file


# A resource's zone and the tariff's timeline of rates for its usage of one type (Tariff.timeline)
_Context = tuple[str, list[int], list[tuple[int, int, Rate | None]]]


@dataclass
class Rater:
    """Rates one account's month, item after item (in month_order); keeps the tier counters and
    the running total, so projected items can follow the real ones."""

    tariff: Tariff
    facts: Facts = field(default_factory=Facts)
    counters: dict[tuple[int, str, str], int] = field(default_factory=dict)
    total: Scaled = ZERO
    # by (usage type, offering, detail, resource): see _context
    _contexts: dict[tuple[int, str, str, str], _Context] = field(
        default_factory=dict, repr=False, compare=False
    )

    @property
    def rounded_total(self) -> Decimal:
        return rounded(self.total, self.tariff.decimals)

    def rate(self, items: Iterable[Item]) -> list[RatedItem]:
        out: list[RatedItem] = []
        append, amount_of, decimals = out.append, self._amount, self.tariff.decimals
        with exact():
            total = self.total
            shown = rounded_here(total, decimals)
            for item in items:
                amount, unpriced, reason, used = amount_of(item)
                total += amount
                now = rounded_here(total, decimals)
                append(RatedItem(item, now - shown, amount, unpriced, reason, used))
                shown = now
                self.total = total
        return out

    def _amount(self, item: Item) -> tuple[Scaled, int, str, tuple[str, ...]]:
        k = item.key
        group = (k.usage_type, k.offering, k.detail, k.resource)
        found = self._contexts.get(group)
        if found is None:
            found = self._contexts[group] = self._context(k)
        zone, starts, pieces = found
        _, end, only = pieces[bisect.bisect_right(starts, k.window_start_ms) - 1]
        if only is not None and k.window_end_ms <= end:  # the common case: one rate over the window
            if k.usage_type in BYTE_TYPES:
                return self._bytes(only, item.quantity), 0, "", only.used
            if not only.needs_size:
                return only.per_hour * item.quantity, 0, "", only.used
        return self._pieces(item, zone)

    def _context(self, k: UsageKey) -> _Context:
        """What rating one resource's usage of one type needs beyond each item: its zone and the
        tariff's timeline of rates for it."""
        zone = self.facts.zone(k.resource) if self.facts.zones else ""
        return (zone, *self.tariff.timeline(k.usage_type, k.offering, k.detail, zone))

    def _pieces(self, item: Item, zone: str) -> tuple[Scaled, int, str, tuple[str, ...]]:
        """A window cut where the rate in force changes (or priced by size, or by no rate)."""
        k = item.key
        pieces = self.tariff.periods(
            k.usage_type, k.offering, k.detail, zone, k.window_start_ms, k.window_end_ms
        )
        amount, unpriced, reasons, used = ZERO, 0, [], []
        parts = split(item.quantity, [(a, b) for a, b, _ in pieces])
        for (a, b, rate), part in zip(pieces, parts, strict=True):
            if not part:
                continue
            if rate is None:
                unpriced += part
                reasons.append(_no_rate(k, zone, a, b))
            elif k.usage_type in BYTE_TYPES:
                amount += self._bytes(rate, part)
                used.append(rate.where)
            else:
                hourly = self._hourly(rate, k)
                if hourly is None:
                    unpriced += part
                    reasons.append(f"{rate.where} prices vCPUs and memory; {k.resource}'s size is unknown")
                else:
                    amount += hourly * part
                    used.append(rate.where)
        return amount, unpriced, "; ".join(dict.fromkeys(reasons)), tuple(dict.fromkeys(used))

    def _hourly(self, rate: Rate, k: UsageKey) -> Decimal | None:
        price = rate.per_hour
        if rate.needs_size:
            # a custom offering's VM: the size it ran with in this record, else what is known now
            size = parse_size(k.detail) or self.facts.size(k.resource, k.offering)
            if size is None:
                return None
            price += rate.per_vcpu_hour * size[0] + rate.per_gib_hour * size[1] / MIB_PER_GIB
        return price

    def _bytes(self, rate: Rate, part: int) -> Scaled:
        """Climb (or, for a negative part, step down) the account's tiers of this rate's group."""
        group = rate.tier_group
        before = self.counters.get(group, 0)
        after = before + part
        self.counters[group] = after
        return (_tiered(rate, after) - _tiered(rate, before)) * HOUR_MS / rate.unit_bytes


def _tiered(rate: Rate, position: int) -> Decimal:
    """Price units times bytes of the month's first `position` bytes under the rate's tiers."""
    if position <= 0:
        return rate.tiers[0].price * position
    total, low = ZERO, 0
    for tier in rate.tiers:
        high = position if tier.up_to_bytes is None else min(position, tier.up_to_bytes)
        if high > low:
            total += tier.price * (high - low)
        if tier.up_to_bytes is None or position <= tier.up_to_bytes:
            break
        low = tier.up_to_bytes
    return total


def split(quantity: int, pieces: list[tuple[int, int]]) -> list[int]:
    """`quantity` split over consecutive pieces of time in proportion to their lengths, exactly:
    floors, then the rest one by one to the largest remainders (earlier first on a tie)."""
    if len(pieces) == 1:
        return [quantity]
    sign, whole = (-1, -quantity) if quantity < 0 else (1, quantity)
    duration = pieces[-1][1] - pieces[0][0]
    parts, remainders = [], []
    for a, b in pieces:
        q, r = divmod(whole * (b - a), duration)
        parts.append(q)
        remainders.append(r)
    for i in sorted(range(len(parts)), key=lambda i: (-remainders[i], i))[: whole - sum(parts)]:
        parts[i] += 1
    return [sign * p for p in parts]


def _no_rate(k: UsageKey, zone: str, start: int, end: int) -> str:
    what = USAGE_TYPE_NAMES.get(k.usage_type, str(k.usage_type))
    if k.detail:
        what += f" of {k.detail} traffic"
    if zone:
        what += f" in zone {zone}"
    if k.offering:
        what += f" on offering {k.offering}"
    return f"no rate in force for {what} over [{start}, {end}) ms"
