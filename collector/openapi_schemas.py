"""The component schemas of kvmeter's own API description (openapi.document()): what each
answer holds, field by field, and the small shapes they are made of (shared with openapi_credits).
"""

from __future__ import annotations

from typing import Any

LETTERS_MAX = 1000  # api_dead_letters.MAX_PAGE
INT = {"type": "integer"}
STR = {"type": "string"}
_WINDOW = {
    "account": {**STR, "description": "Account uuid; empty for bytes no account owns."},
    "usage_type": INT,
    "usage_type_name": STR,
    "resource": STR,
    "offering": STR,
    "traffic_type": {**STR, "description": "Byte usage: public, guest, ...; empty for time usage."},
    "cpunumber": {"type": ["integer", "null"], "description": "VM time on a custom offering: its vCPUs."},
    "memory": {"type": ["integer", "null"], "description": "VM time on a custom offering: its memory, MiB."},
    "start": {**STR, "description": "Window start, UTC (2024-05-14T09:00:00Z)."},
    "end": STR,
    "start_ms": INT,
    "end_ms": INT,
    "unit": {"enum": ["bytes", "ms"]},
}


def ref(schema: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{schema}"}


def json_content(schema: str) -> dict[str, Any]:
    return {"application/json": {"schema": ref(schema)}}


def exact_object(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    """Exactly these fields (all required unless named): a field the API adds or drops fails the
    conformance test."""
    return {
        "type": "object",
        "required": list(properties) if required is None else required,
        "properties": properties,
        "additionalProperties": False,
    }


_LETTER = {
    "id": INT,
    "state": {"enum": ["open", "resolved"]},
    "source": {"enum": ["lifecycle", "measures"]},
    "origin": {**STR, "description": "Where it came from: topic/partition@offset, file:line."},
    "reason": STR,
    "message": STR,
    "size": {**INT, "description": "Bytes."},
    "created": STR,
    "retries": INT,
    "retried": {"type": ["string", "null"]},
    "resolved": {"type": ["string", "null"]},
}
SCHEMAS: dict[str, Any] = {
    "Error": exact_object({"error": STR}),
    "UsageRecord": exact_object(
        {
            **_WINDOW,
            "resource_name": STR,
            "device_type": STR,
            "quantity": {**INT, "description": "Net: recorded + adjustments (ms or bytes)."},
            "rawusage": {**STR, "description": "CloudStack's rawusage: hours or bytes."},
            "recorded": INT,
            "adjustment": INT,
            "final": {"type": "boolean"},
            "transaction_id": {
                "type": ["string", "null"],
                "description": "A final record's billable item id (uuid5 of key, version 0); null if open.",
            },
        }
    ),
    "Adjustment": exact_object(
        {
            **_WINDOW,
            "delta": INT,
            "reason": STR,
            "created": STR,
            "created_ms": INT,
            "seq": {**INT, "description": "Commit order: what pages follow (never a clock)."},
            "version": {**INT, "description": "n: the n-th adjustment of its record."},
            "transaction_id": {
                **STR,
                "description": "Stable id of this billable item: uuid5 of the record's key and version.",
            },
        }
    ),
    "Correction": {
        **exact_object(
            {
                "event_id": STR,
                "resource": STR,
                "resource_type": STR,
                "event_type": {**STR, "description": "The CloudStack usage event it stands for."},
                "time_ms": INT,
                "time": STR,
                "accountid": STR,
                "account": {**STR, "description": "The account's name, when CloudStack's API gave it."},
                "offering": STR,
                "source": STR,
                "reason": STR,
                "created_ms": INT,
                "domainid": STR,
                "domain": STR,
                "domainpath": STR,
            }
        ),
        "required": ["event_id", "resource", "event_type", "time_ms", "accountid", "source", "reason"],
    },
    "WebhookAnswer": exact_object({"status": INT, "message": STR}),
    "DeadLetter": exact_object(_LETTER),
    "DeadLetterWithBytes": exact_object(
        {
            **_LETTER,
            "key": {"type": ["string", "null"], "description": "The record's key, as text."},
            "raw_base64": {**STR, "description": "The bytes as received."},
            "raw_text": {"type": ["string", "null"], "description": "The bytes as text, when UTF-8."},
        }
    ),
    "DeadLetterList": {
        **exact_object(
            {
                "count": INT,
                "dead_letters": {"type": "array", "items": ref("DeadLetter"), "maxItems": LETTERS_MAX},
                "next_after": {**INT, "description": "`after` of the next page; absent on the last."},
            }
        ),
        "required": ["count", "dead_letters"],
    },
    "Retried": exact_object(
        {
            "result": {"enum": ["resolved", "failed", "already_resolved"]},
            "letter": ref("DeadLetter"),
            "applied": exact_object(
                dict.fromkeys(
                    ("events", "known_events", "batches", "duplicates", "billed_bytes", "records"), INT
                )
            ),
        }
    ),
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {
            "status": {"enum": ["ok", "failing", "degraded"]},
            "reason": {**STR, "description": "What is failing or degraded."},
            "schema_version": INT,
            "consumer": {"type": "object", "description": "The Kafka consumer's state."},
            "error": STR,
        },
    },
}
MONEY = {
    "type": "string",
    "pattern": "^-?[0-9]+(\\.[0-9]+)?$",
    "description": "Exact decimal, in `currency`.",
}
_TYPE = {"usage_type": INT, "usage_type_name": STR}
_QUANTITY = {"quantity": {**INT, "description": "ms or bytes (unit)."}, "unit": {"enum": ["bytes", "ms"]}}
_DETAIL = {**STR, "description": "Traffic type of byte usage; service offering of VM time."}
SCHEMAS["CostItem"] = exact_object(
    {
        "kind": {"enum": ["record", "adjustment"]},
        **_TYPE,
        "resource": STR,
        "detail": _DETAIL,
        "start": {**STR, "description": "Its window, UTC."},
        "end": STR,
        **_QUANTITY,
        "cost": MONEY,
        "rates": {"type": "array", "items": STR, "description": "The tariff's rates used (rate.N)."},
        "unpriced": {**INT, "description": "Of the quantity, what no rate covered (see reason)."},
        "reason": STR,
    }
)
SCHEMAS["AccountCosts"] = {
    **exact_object(
        {
            "account": STR,
            "cost": {**MONEY, "description": "So far this month: the sum of the lines' (and items') costs."},
            "projected": {**MONEY, "description": "At the month's end, if what runs now keeps running."},
            "complete": {"type": "boolean", "description": "False when some usage had no rate (unpriced)."},
            "by_usage_type": {
                "type": "array",
                "items": exact_object({**_TYPE, "cost": MONEY, "projected": MONEY}),
            },
            "lines": {
                "type": "array",
                "items": exact_object(
                    {
                        **_TYPE,
                        "resource": STR,
                        "detail": _DETAIL,
                        **_QUANTITY,
                        "cost": MONEY,
                        "projected": MONEY,
                        "unpriced": INT,
                    }
                ),
            },
            "unpriced": {"type": "array", "items": ref("CostItem")},
            "items": {"type": "array", "items": ref("CostItem"), "description": "With items=true."},
        }
    ),
    "required": ["account", "cost", "projected", "complete", "by_usage_type", "lines", "unpriced"],
}
SCHEMAS["Costs"] = exact_object(
    {
        "month": STR,
        "start": STR,
        "end": STR,
        "as_of": STR,
        "currency": {**STR, "description": "ISO 4217: the tariff's one currency."},
        "count": INT,
        "accounts": {"type": "array", "items": ref("AccountCosts")},
    }
)
for _page, _items, _item in (
    ("UsagePage", "usage", "UsageRecord"),
    ("AdjustmentPage", "adjustments", "Adjustment"),
    ("CorrectionPage", "corrections", "Correction"),
):
    SCHEMAS[_page] = exact_object(
        {
            "count": {**INT, "description": "Records on this page."},
            _items: {"type": "array", "items": ref(_item)},
            "next": {"type": ["string", "null"], "description": "Cursor of the next page; null on the last."},
        }
    )
