"""Rendering an account's month of costs as table, JSON or CSV: one piece of code for /v1/costs
and `kvmeter costs`. Money is written as decimal strings (exact, never a float), in the
tariff's currency and to its decimal places."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

from kvmeter.collector import csv_text
from kvmeter.collector.billing import MonthCosts
from kvmeter.collector.billing.costs import CostLine
from kvmeter.collector.billing.money import as_text as money
from kvmeter.collector.billing.rating import RatedItem
from kvmeter.collector.billing.tariff import BYTE_TYPES
from kvmeter.collector.model import USAGE_TYPE_NAMES
from kvmeter.collector.report import iso

FORMATS = ("table", "json", "csv")
CSV_FIELDS = [
    "account", "month", "currency", "usage_type", "usage_type_name", "resource", "detail", "quantity", "unit",
    "cost", "projected", "unpriced",
]  # fmt: skip


def month_text(start_ms: int) -> str:
    return dt.datetime.fromtimestamp(start_ms // 1000, dt.UTC).strftime("%Y-%m")


def _type(usage_type: int) -> dict[str, Any]:
    return {"usage_type": usage_type, "usage_type_name": USAGE_TYPE_NAMES.get(usage_type, str(usage_type))}


def _unit(usage_type: int) -> str:
    return "bytes" if usage_type in BYTE_TYPES else "ms"


def item_dict(rated: RatedItem) -> dict[str, Any]:
    k = rated.item.key
    out = {
        "kind": rated.item.kind,
        **_type(k.usage_type),
        "resource": k.resource,
        "detail": k.detail if k.usage_type in BYTE_TYPES else k.offering,
        "start": iso(k.window_start_ms),
        "end": iso(k.window_end_ms),
        "quantity": rated.item.quantity,
        "unit": _unit(k.usage_type),
        "cost": money(rated.cost),
        "rates": list(rated.rates),
        "unpriced": rated.unpriced,
        "reason": rated.reason,
    }
    return out


def costs_dict(month: MonthCosts, *, items: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "account": month.account,
        "cost": money(month.cost),
        "projected": money(month.projected),
        "complete": month.complete,
        "by_usage_type": [
            {**_type(t), "cost": money(cost), "projected": money(projected)}
            for t, (cost, projected) in month.by_usage_type().items()
        ],
        "lines": [_line(line) for line in month.lines],
        "unpriced": [item_dict(r) for r in month.unpriced],
    }
    if items:
        out["items"] = [item_dict(r) for r in month.items]
    return out


def document(months: Sequence[MonthCosts], currency: str, start_ms: int, end_ms: int, as_of_ms: int,
             *, items: bool = False) -> dict[str, Any]:  # fmt: skip
    """The whole answer: the month, its currency, and each account's costs."""
    return {
        "month": month_text(start_ms),
        "start": iso(start_ms),
        "end": iso(end_ms),
        "as_of": iso(as_of_ms),
        "currency": currency,
        "count": len(months),
        "accounts": [costs_dict(m, items=items) for m in months],
    }


def _line(line: CostLine) -> dict[str, Any]:
    """A month's line as the JSON document and the CSV give it."""
    return {
        **_type(line.usage_type),
        "resource": line.resource,
        "detail": line.detail,
        "quantity": line.quantity,
        "unit": _unit(line.usage_type),
        "cost": money(line.cost),
        "projected": money(line.projected),
        "unpriced": line.unpriced,
    }


def render_csv(months: Sequence[MonthCosts]) -> str:
    rows = (
        {
            "account": month.account,
            "month": month_text(month.start_ms),
            "currency": month.currency,
            **_line(line),
        }
        for month in months
        for line in month.lines
    )
    # Money is a number as text (a credit's or a negative adjustment's starts with -).
    return csv_text.render(CSV_FIELDS, rows, numeric=("cost", "projected"))


def render_table(months: Sequence[MonthCosts]) -> str:
    lines = []
    for month in months:
        note = "" if month.complete else f"  ({len(month.unpriced)} item(s) unpriced: see --format json)"
        lines.append(
            f"{month.account or '(unattributed)'}  {month_text(month.start_ms)}: "
            f"{money(month.cost)} {month.currency} so far, "
            f"{money(month.projected)} {month.currency} projected at the month's end{note}"
        )
        for t, (cost, projected) in month.by_usage_type().items():
            name = USAGE_TYPE_NAMES.get(t, str(t))
            lines.append(f"  {name:<24} {money(cost):>16}  (projected {money(projected)})")
    return "\n".join(lines) + f"\n{len(months)} account(s)\n"


def render(
    months: Sequence[MonthCosts],
    fmt: str,
    *,
    currency: str,
    start_ms: int,
    end_ms: int,
    as_of_ms: int,
    items: bool = False,
) -> str:
    if fmt == "csv":
        return render_csv(months)
    if fmt == "table":
        return render_table(months)
    if fmt == "json":
        return (
            json.dumps(document(months, currency, start_ms, end_ms, as_of_ms, items=items), indent=2) + "\n"
        )
    raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
