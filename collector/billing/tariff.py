"""A tariff: one currency, and rates that price CloudStack usage types over effective periods.

Pure data and lookups; tariff_file reads one from TOML. A rate prices one usage type:
- RUNNING_VM / ALLOCATED_VM: per hour, plus per vCPU-hour and per GiB-hour (the VM's CPU and
  memory from its service offering, as CloudStack's API or the VM's metadata gave them); a rate
  naming an `offering` is for VMs on that offering only;
- IP_ADDRESS: per hour;
- NETWORK_BYTES_SENT / _RECEIVED: per `unit` (GB = 10**9 bytes, GiB = 2**30, ...) of one traffic
  type, flat or in tiers counted per account over the calendar month (UTC).
Any rate may name a `zone` (CloudStack zone uuid). Where several rates match, the most specific
wins (one naming an offering or zone over one that does not); a rate is in force over
[start_ms, end_ms), so a price change takes effect at its instant exactly.
"""

from __future__ import annotations

import bisect
import itertools
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal

from kvmeter.collector.model import NETWORK_BYTES_RECEIVED, NETWORK_BYTES_SENT

FOREVER_MS = 2**62
BYTE_TYPES = frozenset({NETWORK_BYTES_SENT, NETWORK_BYTES_RECEIVED})


@dataclass(frozen=True)
class Tier:
    """A price per unit for the account's monthly bytes below `up_to_bytes` (None: no limit)."""

    up_to_bytes: int | None
    price: Decimal


@dataclass(frozen=True)
class Rate:
    usage_type: int
    where: str  # e.g. "rate.2": how errors and cost lines name it
    start_ms: int = 0
    end_ms: int = FOREVER_MS
    offering: str = ""
    traffic_type: str = ""
    zone: str = ""
    per_hour: Decimal = Decimal(0)
    per_vcpu_hour: Decimal = Decimal(0)
    per_gib_hour: Decimal = Decimal(0)
    unit: str = ""
    unit_bytes: int = 0
    tiers: tuple[Tier, ...] = ()
    # derived, kept (rating reads them once per item):
    tier_group: tuple[int, str, str] = field(init=False, compare=False, repr=False)
    needs_size: bool = field(init=False, compare=False, repr=False)
    used: tuple[str, ...] = field(init=False, compare=False, repr=False)  # (where,): an item's rates

    def __post_init__(self) -> None:
        # Tiers count the account's month of bytes per usage type, traffic type and zone.
        object.__setattr__(self, "tier_group", (self.usage_type, self.traffic_type, self.zone))
        object.__setattr__(self, "needs_size", bool(self.per_vcpu_hour or self.per_gib_hour))
        object.__setattr__(self, "used", (self.where,))

    @property
    def match(self) -> tuple[int, str, str, str]:
        """What the rate applies to; two rates with the same match may not overlap in time."""
        return (self.usage_type, self.traffic_type, self.offering, self.zone)

    @property
    def specificity(self) -> int:
        return (2 if self.offering else 0) + (1 if self.zone else 0)


@dataclass(frozen=True)
class Tariff:
    currency: str
    decimals: int
    rates: tuple[Rate, ...]
    source: str = ""
    _by_type: dict[int, tuple[Rate, ...]] = field(default_factory=dict, compare=False, repr=False)
    _timelines: dict[tuple[int, str, str, str], tuple[list[int], list[tuple[int, int, Rate | None]]]] = field(
        default_factory=dict, compare=False, repr=False
    )  # by (usage type, offering, traffic type, zone): built on first use

    def __post_init__(self) -> None:
        grouped: dict[int, list[Rate]] = defaultdict(list)
        for rate in self.rates:
            grouped[rate.usage_type].append(rate)
        self._by_type.update({t: tuple(rs) for t, rs in grouped.items()})

    def usage_types(self) -> frozenset[int]:
        return frozenset(self._by_type)

    def periods(
        self, usage_type: int, offering: str, traffic_type: str, zone: str, start_ms: int, end_ms: int
    ) -> list[tuple[int, int, Rate | None]]:
        """[start, end) cut where the rate in force changes: (piece start, piece end, the most
        specific matching rate in force, None where none is)."""
        starts, pieces = self.timeline(usage_type, offering, traffic_type, zone)
        i = bisect.bisect_right(starts, start_ms) - 1
        a, b, rate = pieces[i]
        if end_ms <= b:  # the common case: one rate over the whole window
            return [(start_ms, end_ms, rate)]
        out = [(start_ms, b, rate)]
        for a, b, rate in pieces[i + 1 :]:
            if a >= end_ms:
                break
            out.append((a, min(b, end_ms), rate))
        return out

    def timeline(
        self, usage_type: int, offering: str, traffic_type: str, zone: str
    ) -> tuple[list[int], list[tuple[int, int, Rate | None]]]:
        """All of time cut where the rate in force for this usage changes: (piece starts,
        pieces (start, end, the rate or None)); built on first use."""
        if usage_type not in BYTE_TYPES:
            traffic_type = ""
        key = (usage_type, offering, traffic_type, zone)
        timeline = self._timelines.get(key)
        if timeline is None:
            timeline = self._timelines[key] = self._timeline(*key)
        return timeline

    def _timeline(
        self, usage_type: int, offering: str, traffic_type: str, zone: str
    ) -> tuple[list[int], list[tuple[int, int, Rate | None]]]:
        """All of time, -FOREVER_MS to FOREVER_MS, cut where the rate in force for this usage
        changes: (piece starts, pieces)."""
        matching = [
            r
            for r in self._by_type.get(usage_type, ())
            if r.traffic_type == traffic_type and r.offering in ("", offering) and r.zone in ("", zone)
        ]
        cuts = {-FOREVER_MS, FOREVER_MS}
        for r in matching:
            cuts.update((r.start_ms, r.end_ms))
        pieces: list[tuple[int, int, Rate | None]] = []
        for a, b in itertools.pairwise(sorted(cuts)):
            in_force = [r for r in matching if r.start_ms <= a < r.end_ms]
            best = max(in_force, key=lambda r: r.specificity) if in_force else None
            if pieces and pieces[-1][2] is best:
                pieces[-1] = (pieces[-1][0], b, best)
            else:
                pieces.append((a, b, best))
        return [p[0] for p in pieces], pieces
