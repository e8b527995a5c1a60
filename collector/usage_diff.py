"""Two stores' usage compared by account, usage type and window (`kvmeter rebuild`'s report).

    by_window(rows)               net quantity per (account, usage type, window start, end)
    differences(live, rebuilt)    the keys where they differ, with both quantities
    render(diffs, limit)          a table for people

Net quantities (record + adjustments): a live store that corrected a final window by an
adjustment and a rebuild that wrote the window once agree when they bill the same.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

from kvmeter.collector.report import iso
from kvmeter.collector.store import UsageRow


class WindowKey(NamedTuple):
    account: str
    usage_type: int
    window_start_ms: int
    window_end_ms: int


class Difference(NamedTuple):
    key: WindowKey
    live: int
    rebuilt: int


def by_window(rows: Iterable[UsageRow], through_ms: int | None = None) -> dict[WindowKey, int]:
    """Net quantity per account, type and window; only windows ending at or before
    `through_ms` when given. Zero totals are left out."""
    totals: dict[WindowKey, int] = {}
    for row in rows:
        k = row.key
        if through_ms is not None and k.window_end_ms > through_ms:
            continue
        key = WindowKey(k.account, k.usage_type, k.window_start_ms, k.window_end_ms)
        totals[key] = totals.get(key, 0) + row.quantity
    return {k: v for k, v in totals.items() if v}


def differences(live: Mapping[WindowKey, int], rebuilt: Mapping[WindowKey, int]) -> list[Difference]:
    keys = sorted(set(live) | set(rebuilt), key=lambda k: (k.window_start_ms, k.account, k.usage_type, k))
    return [
        Difference(k, live.get(k, 0), rebuilt.get(k, 0)) for k in keys if live.get(k, 0) != rebuilt.get(k, 0)
    ]


def render(diffs: list[Difference], limit: int = 50) -> str:
    if not diffs:
        return "no difference\n"
    header = ("window start", "window end", "account", "type", "live", "rebuilt", "rebuilt - live")
    rows = [
        (iso(d.key.window_start_ms), iso(d.key.window_end_ms), d.key.account, str(d.key.usage_type),
         str(d.live), str(d.rebuilt), f"{d.rebuilt - d.live:+d}")
        for d in diffs[:limit]
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]
    ]
    if len(diffs) > limit:
        lines.append(f"... and {len(diffs) - limit} more")
    return "\n".join(lines) + "\n"
