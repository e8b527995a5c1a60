"""Rendering usage records as table, JSON, CSV or CloudStack's listUsageRecords response.

One piece of code for the HTTP API and the CLI. Quantities are net (recorded + adjustments);
JSON and CSV also show both parts, so a billing system can see what changed after a window
became final.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

from kvmeter.collector import api_params, billable, cloudstack_render, csv_text
from kvmeter.collector.cloudstack_render import RecordFacts
from kvmeter.collector.model import (
    ALLOCATED_VM,
    IP_ADDRESS,
    NETWORK_BYTES_RECEIVED,
    NETWORK_BYTES_SENT,
    RUNNING_VM,
    UNATTRIBUTED,
    USAGE_TYPE_NAMES,
    UsageKey,
)
from kvmeter.collector.owner_directory import OwnerDirectory
from kvmeter.collector.store import Adjustment, UsageRow
from kvmeter.collector.text_table import text_table
from kvmeter.collector.usage import rawusage
from kvmeter.collector.vm_size import parse_size

FORMATS = ("table", "json", "csv", "cloudstack")
BYTE_TYPES = (NETWORK_BYTES_SENT, NETWORK_BYTES_RECEIVED)
DESCRIPTIONS = {
    RUNNING_VM: "Running Vm Usage",
    ALLOCATED_VM: "Allocated Vm Usage",
    IP_ADDRESS: "IP Address Usage",
    NETWORK_BYTES_SENT: "Network Usage (Bytes Sent)",
    NETWORK_BYTES_RECEIVED: "Network Usage (Bytes Received)",
}
CSV_FIELDS = [
    "account", "usage_type", "usage_type_name", "resource", "resource_name", "device_type", "offering",
    "traffic_type", "cpunumber", "memory", "start", "end", "start_ms", "end_ms", "quantity", "unit",
    "rawusage", "recorded", "adjustment", "final", "transaction_id",
]  # fmt: skip


def iso(ms: int) -> str:
    """UTC ISO 8601 with a Z: 2024-05-14T09:00:00Z."""
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _owner_fields(k: UsageKey) -> dict[str, Any]:
    return {
        "account": k.account,
        "usage_type": k.usage_type,
        "usage_type_name": USAGE_TYPE_NAMES.get(k.usage_type, str(k.usage_type)),
        "resource": k.resource,
    }


def _window_fields(k: UsageKey) -> dict[str, Any]:
    bytes_ = k.usage_type in BYTE_TYPES
    size = None if bytes_ else parse_size(k.detail)
    return {
        "offering": k.offering,
        "traffic_type": k.detail if bytes_ else "",
        "cpunumber": size[0] if size else None,
        "memory": size[1] if size else None,
        "start": iso(k.window_start_ms),
        "end": iso(k.window_end_ms),
        "start_ms": k.window_start_ms,
        "end_ms": k.window_end_ms,
    }


def _unit(k: UsageKey) -> str:
    return "bytes" if k.usage_type in BYTE_TYPES else "ms"


def record_dict(row: UsageRow) -> dict[str, Any]:
    k = row.key
    return {
        **_owner_fields(k),
        "resource_name": row.resource_name,
        "device_type": row.device_type,
        **_window_fields(k),
        "quantity": row.quantity,
        "unit": _unit(k),
        "rawusage": rawusage(k.usage_type, row.quantity),
        "recorded": row.recorded,
        "adjustment": row.adjustment,
        "final": row.final,
        # The record as finalized (version 0); its adjustments carry their own (/v1/adjustments).
        "transaction_id": billable.transaction_id(k, 0) if row.final else None,
    }


ADJUSTMENT_FIELDS = [
    "account", "usage_type", "usage_type_name", "resource", "offering", "traffic_type", "cpunumber", "memory",
    "start", "end",
    "start_ms", "end_ms", "delta", "unit", "reason", "created", "created_ms", "seq", "version",
    "transaction_id",
]  # fmt: skip


def adjustment_dict(adj: Adjustment) -> dict[str, Any]:
    k = adj.key
    return {
        **_owner_fields(k),
        **_window_fields(k),
        "delta": adj.delta,
        "unit": _unit(k),
        "reason": adj.reason,
        "created": iso(adj.created_ms),
        "created_ms": adj.created_ms,
        "seq": adj.seq,
        "version": adj.version,
        "transaction_id": adj.transaction_id,
    }


def render_adjustments(adjustments: Sequence[Adjustment], fmt: str) -> str:
    """JSON or CSV of adjustment rows."""
    rows = [adjustment_dict(a) for a in adjustments]
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    if fmt == "csv":
        return csv_text.render(ADJUSTMENT_FIELDS, rows)
    raise ValueError(f"unknown format {fmt!r} for adjustments; json or csv")


def cloudstack_response(rows: Sequence[UsageRow], directory: OwnerDirectory | None = None) -> dict[str, Any]:
    """listUsageRecords' JSON response for the CLI (the API's /client/api renders the same
    records, with the same owner directory: account names, domains, zones, sizes). Unattributed
    bytes belong to no CloudStack account and are left out here (they are in the JSON/CSV
    reports and the metrics)."""
    directory = directory or OwnerDirectory()
    records = [
        cloudstack_render.usage_record(record_facts(r, directory))
        for r in rows
        if r.key.account != UNATTRIBUTED
    ]
    # CloudStack leaves an empty list's count and list out, as /client/api does
    body = {"count": len(records), "usagerecord": records} if records else {}
    return {"listusagerecordsresponse": body}


def record_facts(row: UsageRow, directory: OwnerDirectory) -> RecordFacts:
    """A record with what the directory knows of its account, VM and offering (listUsageRecords'
    fields, for /client/api and the CLI alike)."""
    k = row.key
    owner, instance = directory.owner(k.account), directory.instance(k.resource, k.account)
    offering = directory.offering(k.offering)
    return RecordFacts(k, row.quantity, row.resource_name, row.device_type, owner, instance, offering)


def render(rows: Sequence[UsageRow], fmt: str, directory: OwnerDirectory | None = None) -> str:
    if fmt == "json":
        return json.dumps([record_dict(r) for r in rows], indent=2) + "\n"
    if fmt == "csv":  # rawusage: a number as text (a net quantity below zero starts with -)
        return csv_text.render(CSV_FIELDS, (record_dict(r) for r in rows), numeric=("rawusage",))
    if fmt == "cloudstack":
        return json.dumps(cloudstack_response(rows, directory), indent=2) + "\n"
    if fmt == "table":
        return _table(rows)
    raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")


def _table(rows: Sequence[UsageRow]) -> str:
    header = ["START (UTC)", "END", "ACCOUNT", "TYPE", "RESOURCE", "DETAIL", "QUANTITY", "FINAL"]
    lines = [header]
    for r in rows:
        k = r.key
        name = USAGE_TYPE_NAMES.get(k.usage_type, str(k.usage_type))
        unit = "B" if k.usage_type in BYTE_TYPES else "h"
        quantity = f"{rawusage(k.usage_type, r.quantity)} {unit}"
        if r.adjustment:  # in the quantity's unit (hours for VM and IP time), as rawusage shows it
            adjustment = rawusage(k.usage_type, r.adjustment)
            quantity += f" (adj {'' if adjustment.startswith('-') else '+'}{adjustment})"
        detail = k.detail if k.usage_type in BYTE_TYPES else " ".join(filter(None, (k.offering, k.detail)))
        resource = f"{r.resource_name} {k.resource}".strip() if r.resource_name else k.resource
        lines.append(
            [iso(k.window_start_ms), iso(k.window_end_ms)[11:], k.account or "(unattributed)", name, resource,
             detail, quantity, "yes" if r.final else "open"]
        )  # fmt: skip
    return text_table(lines[0], lines[1:]) + f"\n{len(rows)} record(s)\n"


def parse_when(text: str, *, end_of_day: bool = False) -> int:
    """A time argument -> ms since the epoch, UTC (api_params.time_ms: the API's own parser)."""
    return api_params.time_ms(text, end_of_day=end_of_day)
