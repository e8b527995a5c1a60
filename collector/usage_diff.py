"""Two stores' usage compared by account, usage type and window (`kvmeter rebuild`'s report).

    by_window(rows)               net quantity per (account, usage type, window start, end)
    differences(live, rebuilt)    the keys where they differ, with both quantities
    merge_differences(live, rebuilt)  the same from two streams in key order (store/window_totals.py):
                                  memory holds the differences only, never either store
    render(diffs, limit)          a table for people

Net quantities (record + adjustments): a live store that corrected a final window by an
adjustment and a rebuild that wrote the window once agree when they bill the same.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import NamedTuple

from kvmeter.collector.report import iso
from kvmeter.collector.store import UsageRow
from kvmeter.collector.text_table import text_table


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


def merge_differences(
    live: Iterable[tuple[WindowKey, int]], rebuilt: Iterable[tuple[WindowKey, int]]
) -> list[Difference]:
    """differences() of two (key, net quantity) streams, each sorted by key with each key once:
    a merge walk. Raises ValueError when a stream is out of order (the walk would be wrong)."""
    found: list[Difference] = []
    a, b = _ordered(live), _ordered(rebuilt)
    x, y = next(a, None), next(b, None)
    while x is not None or y is not None:
        if y is None or (x is not None and x[0] < y[0]):
            assert x is not None
            key, mine, theirs = x[0], x[1], 0
            x = next(a, None)
        elif x is None or y[0] < x[0]:
            key, mine, theirs = y[0], 0, y[1]
            y = next(b, None)
        else:
            key, mine, theirs = x[0], x[1], y[1]
            x, y = next(a, None), next(b, None)
        if mine != theirs:
            found.append(Difference(key, mine, theirs))
    found.sort(key=lambda d: (d.key.window_start_ms, d.key.account, d.key.usage_type, d.key))
    return found


def _ordered(pairs: Iterable[tuple[WindowKey, int]]) -> Iterator[tuple[WindowKey, int]]:
    last: WindowKey | None = None
    for key, quantity in pairs:
        if last is not None and not last < key:
            raise ValueError(f"window totals out of key order: {key} after {last}")
        last = key
        yield key, quantity


def render(diffs: list[Difference], limit: int = 50) -> str:
    if not diffs:
        return "no difference\n"
    header = ("window start", "window end", "account", "type", "live", "rebuilt", "rebuilt - live")
    rows = [
        (iso(d.key.window_start_ms), iso(d.key.window_end_ms), d.key.account, str(d.key.usage_type),
         str(d.live), str(d.rebuilt), f"{d.rebuilt - d.live:+d}")
        for d in diffs[:limit]
    ]  # fmt: skip
    lines = [text_table(header, rows)]
    if len(diffs) > limit:
        lines.append(f"... and {len(diffs) - limit} more")
    return "\n".join(lines) + "\n"
