"""Billable items and their transaction ids. Pure: no I/O, no clock.

A finalized usage record and each adjustment to it is one billable item. Its transaction id is
a UUID (version 5, name-based) of the record's key and the item's version: 0 for the record as
finalized, n for the n-th adjustment of that record. Nothing random and nothing the database
numbers goes in, so the same inputs give the same ids again, in a new store too; a billing
system that deduplicates by transaction id charges each item exactly once however often it
arrives.

    transaction_id(key, version) -> "1b4e28ba-2fa1-5d2e-..."
    record_item(key, quantity, names, finalized_ms) / adjustment_item(key, version, delta, ...)

With a tariff, the store adds each item's "cost" before it goes to the outbox
(store/item_costs.py).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from kvmeter.collector.model import NETWORK_BYTES_RECEIVED, NETWORK_BYTES_SENT, USAGE_TYPE_NAMES, UsageKey
from kvmeter.collector.vm_size import parse_size

# Fixed forever: changing it would change every id ever handed off.
NAMESPACE = uuid.UUID("6f1c9a52-3e4b-5d87-9a0e-6b3c2d1f8e47")
RECORD = "record"
ADJUSTMENT = "adjustment"


def transaction_id(key: UsageKey, version: int) -> str:
    """uuid5 of the key's fields (in UsageKey order) and the version, as compact JSON."""
    name = json.dumps([*key, version], separators=(",", ":"), ensure_ascii=True)
    return str(uuid.uuid5(NAMESPACE, name))


def _item(key: UsageKey, kind: str, version: int, quantity: int) -> dict[str, Any]:
    bytes_ = key.usage_type in (NETWORK_BYTES_SENT, NETWORK_BYTES_RECEIVED)
    size = None if bytes_ else parse_size(key.detail)
    return {
        "transaction_id": transaction_id(key, version),
        "kind": kind,
        "version": version,
        "account": key.account,
        "usage_type": key.usage_type,
        "usage_type_name": USAGE_TYPE_NAMES.get(key.usage_type, str(key.usage_type)),
        "resource": key.resource,
        "offering": key.offering,
        "traffic_type": key.detail if bytes_ else "",
        "cpunumber": size[0] if size else None,  # VM time on a custom offering (vm_size.py)
        "memory": size[1] if size else None,
        "start_ms": key.window_start_ms,
        "end_ms": key.window_end_ms,
        "quantity": quantity,
        "unit": "bytes" if bytes_ else "ms",
    }


def record_item(key: UsageKey, quantity: int, resource_name: str, made_ms: int) -> dict[str, Any]:
    """The record as it became final (version 0); quantity as recorded."""
    return {**_item(key, RECORD, 0, quantity), "resource_name": resource_name, "made_ms": made_ms}


def adjustment_item(key: UsageKey, version: int, delta: int, reason: str, made_ms: int) -> dict[str, Any]:
    """The version-th change to a final record: quantity is the signed delta."""
    return {**_item(key, ADJUSTMENT, version, delta), "reason": reason, "made_ms": made_ms}


def record_of(item: dict[str, Any]) -> str:
    """The record an item belongs to (its versions share it): a uuid5 of the item's key fields,
    so that the outbox can hand a record's versions to a sink in version order."""
    fields = ("account", "usage_type", "resource", "offering", "traffic_type", "cpunumber", "memory")
    name = json.dumps([*(item[f] for f in fields), item["start_ms"], item["end_ms"]], separators=(",", ":"))
    return str(uuid.uuid5(NAMESPACE, name))


def encode(item: dict[str, Any]) -> str:
    """The item as stored and sent: JSON with sorted keys (the same bytes for the same item)."""
    return json.dumps(item, sort_keys=True, separators=(",", ":"))
