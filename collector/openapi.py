"""The OpenAPI 3.1 description of kvmeter's own API (/v1, /health, /metrics), served at
/v1/openapi.json. CloudStack's /client/api is CloudStack's own API and described there.

tests/integration/test_openapi.py keeps it true: every route is here and every path here is a
route, and the live server's answers to generated requests validate against these schemas.
"""

from __future__ import annotations

from typing import Any

from kvmeter.collector import openapi_credits
from kvmeter.collector.api_params import (
    MAX_CURSOR,
    MAX_TIME_MS,
    MAX_USAGE_TYPE,
    MONTH_PATTERN,
    TIME_FORMS,
    TIME_PATTERN,
    Paging,
)
from kvmeter.collector.cost_report import CSV_FIELDS as COST_CSV_FIELDS
from kvmeter.collector.input_webhook import PATH as WEBHOOK_PATH
from kvmeter.collector.openapi_schemas import LETTERS_MAX, SCHEMAS, STR
from kvmeter.collector.openapi_schemas import json_content as _json
from kvmeter.collector.report import ADJUSTMENT_FIELDS, CSV_FIELDS

LETTER_ID_MAX = 2**62  # api_dead_letters.MAX_ID

TIME_TEXT = f"{TIME_FORMS}; naive times are UTC; from 1970-01-01 to 9999-12-31 (ms 0 to {MAX_TIME_MS})"


def _query(name: str, description: str, schema: dict[str, Any], *, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "description": description, "schema": schema}


def _time(name: str, description: str, *, required: bool = False) -> dict[str, Any]:
    schema = {"type": "string", "pattern": TIME_PATTERN}
    return _query(name, f"{description} ({TIME_TEXT}).", schema, required=required)


_ID = {"type": "string", "maxLength": 255}
_PARAMS = {
    "account": _query("account", "Only this account (uuid).", _ID),
    "type": _query(
        "type",
        "Only this CloudStack usage type id.",
        {"type": "integer", "minimum": 0, "maximum": MAX_USAGE_TYPE},
    ),
    "resource": _query("resource", "Only this resource (VM or IP address uuid).", _ID),
    "format": _query("format", "json (the default) or csv.", {"type": "string", "enum": ["json", "csv"]}),
    "cursor": _query(
        "cursor",
        "The `next` of the previous page, with the same other parameters.",
        {"type": "string", "maxLength": MAX_CURSOR},
    ),
}

_LETTER_ID = {
    "name": "letter_id",
    "in": "path",
    "required": True,
    "schema": {"type": "integer", "minimum": 0, "maximum": LETTER_ID_MAX},
}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": _json("Error")}


_ERRORS = {
    "400": _error("A parameter refused, with the reason."),
    "401": _error("Missing or wrong credentials."),
    "403": _error("The credential may not read that account."),
    "405": _error("Only GET (and HEAD)."),
    "413": _error("A request body over the limit."),
}
_NEXT_LINK = {
    "Link": {
        "description": 'The next page: <URL>; rel="next" (absent on the last page).',
        "schema": {"type": "string"},
    }
}


def _csv(fields: list[str]) -> dict[str, Any]:
    return {"schema": {"type": "string", "description": "Header line: " + ",".join(fields)}}


def _limit(paging: Paging) -> dict[str, Any]:
    return _query(
        "limit",
        f"Records per page (default {paging.page_size}).",
        {"type": "integer", "minimum": 1, "maximum": paging.max_page_size},
    )


def document(*, webhook: bool = False, paging: Paging | None = None) -> dict[str, Any]:
    """The description of the API as served: with the webhook receiver when it is configured,
    with the page sizes configured."""
    limit = _limit(paging or Paging())
    page_params = [_PARAMS["format"], limit, _PARAMS["cursor"]]
    doc = {
        "openapi": "3.1.0",
        "info": {
            "title": "kvmeter collector API",
            "version": "1",
            "description": (
                "Usage records of a KVM cloud, in CloudStack's usage types. Every path but /health "
                "needs the API's credentials when it has any (Authorization: Bearer <token>). A "
                "credential scoped to accounts reads only those accounts' records."
            ),
        },
        "security": [{"bearer": []}, {}],
        "paths": {
            "/v1/usage": {
                "get": {
                    "summary": "Usage records whose window starts in [start, end), a page at a time",
                    "description": "Stable order: window start, then record. Quantities are net.",
                    "parameters": [
                        _time("start", "From", required=True),
                        _time("end", "To, exclusive", required=True),
                        *(_PARAMS[name] for name in ("account", "type", "resource")),
                        *page_params,
                    ],
                    "responses": {
                        "200": {
                            "description": "One page of records.",
                            "headers": _NEXT_LINK,
                            "content": {
                                **_json("UsagePage"),
                                "text/csv": _csv(CSV_FIELDS),
                            },
                        },
                        **_ERRORS,
                    },
                }
            },
            "/v1/adjustments": {
                "get": {
                    "summary": "Changes to final windows created in [since, until), a page at a time",
                    "description": (
                        "What a billing system that already took those windows must apply. Pages "
                        "follow `seq`, given in commit order, so a row committed late by another "
                        "replica is never stepped over; `since`/`until` only filter."
                    ),
                    "parameters": [
                        _time("since", "Created from", required=True),
                        _time("until", "Created before (default: no end)"),
                        _PARAMS["account"],
                        _query(
                            "after",
                            "Only rows whose seq is greater (a poller's last seq; default 0).",
                            {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
                        ),
                        *page_params,
                    ],
                    "responses": {
                        "200": {
                            "description": "One page of adjustments, in the order they were made.",
                            "headers": _NEXT_LINK,
                            "content": {
                                **_json("AdjustmentPage"),
                                "text/csv": _csv(ADJUSTMENT_FIELDS),
                            },
                        },
                        **_ERRORS,
                    },
                }
            },
            "/v1/costs": {
                "get": {
                    "summary": "Costs per account in a month, rated live from its usage under the tariff",
                    "description": (
                        "Cost so far by usage type and resource, each record's and adjustment's "
                        "cost (items=true), what no rate covered, and a projection to the month's end."
                    ),
                    "parameters": [
                        _query(
                            "month",
                            "yyyy-MM, UTC (default: this month).",
                            {"type": "string", "pattern": MONTH_PATTERN},
                        ),
                        _PARAMS["account"],
                        _query(
                            "items",
                            "Every record's and adjustment's cost too (one account).",
                            {"type": "boolean"},
                        ),
                        _PARAMS["format"],
                    ],
                    "responses": {
                        "200": {
                            "description": "Each account's costs.",
                            "content": {**_json("Costs"), "text/csv": _csv(COST_CSV_FIELDS)},
                        },
                        "404": _error("No tariff is configured ([billing] tariff_file)."),
                        **_ERRORS,
                    },
                }
            },
            "/v1/corrections": {
                "get": {
                    "summary": "What reconciliation against CloudStack's API changed, by time",
                    "description": (
                        "Corrections in [start, end), a page at a time. Stable order: time, then "
                        "the correcting event."
                    ),
                    "parameters": [
                        _time("start", "From (default: the beginning)"),
                        _time("end", "To, exclusive (default: no end)"),
                        _PARAMS["account"],
                        _PARAMS["resource"],
                        limit,
                        _PARAMS["cursor"],
                    ],
                    "responses": {
                        "200": {
                            "description": "One page of corrections.",
                            "headers": _NEXT_LINK,
                            "content": _json("CorrectionPage"),
                        },
                        **_ERRORS,
                    },
                }
            },
            "/v1/dead-letters": {
                "get": {
                    "summary": "Dead letters, oldest first, without their bytes (operator credentials only)",
                    "parameters": [
                        _query(
                            "state",
                            "open (the default), resolved or all.",
                            {"type": "string", "enum": ["open", "resolved", "all"]},
                        ),
                        _query(
                            "source",
                            "Only this input.",
                            {"type": "string", "enum": ["lifecycle", "measures"]},
                        ),
                        _query(
                            "after",
                            "Only ids above this (the `next_after` of the previous page).",
                            {"type": "integer", "minimum": 0, "maximum": LETTER_ID_MAX},
                        ),
                        _query(
                            "limit",
                            "Letters per page (default 100).",
                            {"type": "integer", "minimum": 1, "maximum": LETTERS_MAX},
                        ),
                    ],
                    "responses": {
                        "200": {"description": "Dead letters.", "content": _json("DeadLetterList")},
                        **_ERRORS,
                    },
                }
            },
            "/v1/dead-letters/{letter_id}": {
                "get": {
                    "summary": "One dead letter with its bytes (operator credentials only)",
                    "parameters": [_LETTER_ID],
                    "responses": {
                        "200": {"description": "The letter.", "content": _json("DeadLetterWithBytes")},
                        "404": _error("No such letter."),
                        **_ERRORS,
                    },
                }
            },
            "/v1/dead-letters/{letter_id}/retry": {
                "post": {
                    "summary": "Apply a dead letter again through the live path (operator credentials only)",
                    "description": (
                        "Idempotent: retrying twice bills once. A letter that succeeds is marked "
                        "resolved and kept; one that fails again stays open with its new reason."
                    ),
                    "parameters": [_LETTER_ID],
                    "responses": {
                        "200": {"description": "What the retry did.", "content": _json("Retried")},
                        "404": _error("No such letter."),
                        "409": _error("This server runs without the collector's settings."),
                        **_ERRORS,
                        "405": _error("Only POST."),
                    },
                }
            },
            "/v1/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.1",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                        **_ERRORS,
                    },
                }
            },
            "/health": {
                "get": {
                    "summary": "Whether the collector works: store, consumer, broker",
                    "security": [{}],
                    "responses": {
                        "200": _health("Working."),
                        "503": _health(
                            "The store is unavailable, a store write is being retried (failing) "
                            "or no Kafka broker has been reachable for too long (degraded)."
                        ),
                        "405": _ERRORS["405"],
                        "413": _ERRORS["413"],
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {
                            "description": "Prometheus text format.",
                            "content": {"text/plain": {"schema": STR}},
                        },
                        "404": _error("Metrics are not enabled."),
                        **_ERRORS,
                    },
                }
            },
        },
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
    paged = ([limit, _PARAMS["cursor"]], _NEXT_LINK)
    doc["paths"].update(openapi_credits.paths(_PARAMS["account"], _ERRORS, _error, _json, paged))  # type: ignore[attr-defined]
    doc["components"]["schemas"] = {**SCHEMAS, **openapi_credits.SCHEMAS}  # type: ignore[index]
    if webhook:
        doc["paths"][WEBHOOK_PATH] = _webhook()  # type: ignore[index]
    return doc


def _webhook() -> dict[str, Any]:
    def header(name: str, description: str, *, required: bool = False) -> dict[str, Any]:
        return {"name": name, "in": "header", "required": required, "description": description,
                "schema": {"type": "string"}}  # fmt: skip

    def answer(description: str) -> dict[str, Any]:
        return {"description": description, "content": _json("WebhookAnswer")}

    return {
        "post": {
            "summary": "CloudStack's webhook deliveries of events (when [webhook] is configured)",
            "security": [{}],
            "parameters": [
                header(
                    "X-CS-Signature",
                    "Base64 HMAC-SHA256 of the body with the webhook's secret.",
                    required=True,
                ),
                header("X-CS-Event-ID", "CloudStack's delivery id."),
                header("X-CS-Event", "The event type."),
            ],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {}}}},
            "responses": {
                "200": answer("Stored."),
                "401": answer("Missing or wrong signature."),
                "413": _ERRORS["413"],
                "503": answer("Not stored yet or too many waiting: deliver again later (Retry-After)."),
            },
        }
    }


def _health(description: str) -> dict[str, Any]:
    return {"description": description, "content": _json("Health")}
