"""Billable items and their transaction ids: derived from the key and version alone."""

from __future__ import annotations

import json

import pytest

from kvmeter.collector import billable
from kvmeter.collector.model import UsageKey

KEY = UsageKey("acct-a", 4, "vm-1", "", "public", 1715677200000, 1715680800000)


def test_the_derivation_is_fixed() -> None:
    # Pinned: a change here would re-id every item a billing system already holds.
    assert billable.transaction_id(KEY, 0) == "10b1a158-cb14-5f8b-bfc4-dd86b0abebdc"
    assert billable.transaction_id(KEY, 1) == "f4db3640-bdea-5823-bc98-a00e5cd53918"


@pytest.mark.parametrize(
    "other",
    [
        KEY._replace(account="acct-b"),
        KEY._replace(usage_type=5),
        KEY._replace(resource="vm-2"),
        KEY._replace(offering="small"),
        KEY._replace(detail="guest"),
        KEY._replace(window_start_ms=KEY.window_start_ms + 1),
        KEY._replace(window_end_ms=KEY.window_end_ms + 1),
        # Field boundaries count: the fields are a JSON array, not a joined string.
        KEY._replace(account="acct-a,4", usage_type=4),
    ],
)
def test_every_field_of_the_key_is_in_the_id(other: UsageKey) -> None:
    assert billable.transaction_id(other, 0) != billable.transaction_id(KEY, 0)


def test_items_say_what_they_bill() -> None:
    record = billable.record_item(KEY, 1500, "i-2-10-VM", 99)
    assert record["transaction_id"] == billable.transaction_id(KEY, 0)
    assert (record["kind"], record["version"], record["quantity"], record["unit"]) == (
        "record",
        0,
        1500,
        "bytes",
    )
    assert record["usage_type_name"] == "NETWORK_BYTES_SENT"
    adjustment = billable.adjustment_item(KEY._replace(usage_type=1), 2, -60_000, "late lifecycle", 100)
    assert (adjustment["kind"], adjustment["version"], adjustment["unit"]) == ("adjustment", 2, "ms")
    assert adjustment["transaction_id"] == billable.transaction_id(KEY._replace(usage_type=1), 2)
    assert json.loads(billable.encode(adjustment)) == adjustment
    assert billable.encode(adjustment) == billable.encode(dict(reversed(adjustment.items())))
