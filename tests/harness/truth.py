"""Billed bytes next to the truth, for whole-pipeline tests: by (VM uuid, usage type, traffic type)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

from kvmeter.collector.model import NETWORK_BYTES_RECEIVED, NETWORK_BYTES_SENT
from kvmeter.collector.store import Store

Usage = dict[tuple[str, int, str], int]


def billed(store: Store) -> Usage:
    """Every byte record of the store, summed over windows."""
    out: Usage = defaultdict(int)
    for key, qty in store.net_usage().items():
        if key.usage_type in (NETWORK_BYTES_SENT, NETWORK_BYTES_RECEIVED):
            out[(key.resource, key.usage_type, key.detail)] += qty
    return dict(out)


def truth_table(expected: Usage, got: Usage, names: Mapping[str, str], truth: str = "EXPECTED") -> str:
    """One line per VM, direction and traffic type: the truth, what was billed, the difference."""
    lines = [f"{'VM':<10} {'DIRECTION':<9} {'TRAFFIC':<8} {truth:>12} {'BILLED':>12} {'DIFF':>8}"]
    for key in sorted(set(expected) | set(got)):
        vm, usage_type, traffic = key
        e, b = expected.get(key, 0), got.get(key, 0)
        direction = "sent" if usage_type == NETWORK_BYTES_SENT else "received"
        lines.append(f"{names.get(vm, vm):<10} {direction:<9} {traffic:<8} {e:>12} {b:>12} {b - e:>+8}")
    return "\n".join(lines)
