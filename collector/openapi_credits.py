"""The OpenAPI description of /v1/credits and /v1/balances (api_credits), merged into
openapi.document()."""

from __future__ import annotations

from typing import Any

from kvmeter.collector.credit_keys import KEY
from kvmeter.collector.money_input import AMOUNT, CURRENCY, MAX_NOTE
from kvmeter.collector.openapi_schemas import STR as _STR
from kvmeter.collector.openapi_schemas import exact_object as _object

_MONEY = {"type": "string", "description": "An exact decimal amount, as text."}
_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "The caller's id of this credit (e.g. the payment's), unique per account: a "
    "retry with the same key and body adds nothing and answers the credit added first.",
    "schema": {"type": "string", "pattern": f"^{KEY.pattern}$"},
}
_REPLAYED = {
    "Idempotent-Replayed": {
        "description": "`true`: the Idempotency-Key's credit, added by an earlier request.",
        "schema": {"type": "string", "enum": ["true"]},
    }
}


SCHEMAS: dict[str, Any] = {
    "NewCredit": _object(
        {
            "account": {"type": "string", "minLength": 1, "maxLength": 64, "description": "Account uuid."},
            "amount": {"type": "string", "pattern": f"^{AMOUNT.pattern}$", "description": 'e.g. "25.00".'},
            "currency": {
                "type": "string",
                "pattern": f"^{CURRENCY.pattern}$",
                "description": "Needed when the collector rates no tariff; else the tariff's or absent.",
            },
            "note": {"type": "string", "maxLength": MAX_NOTE},
        },
        required=["account", "amount"],
    ),
    "Credit": _object(
        {
            "id": {"type": "integer"},
            "account": _STR,
            "amount": _MONEY,
            "currency": _STR,
            "note": _STR,
            "created_by": {**_STR, "description": "The credential that added it (`cli` from the CLI)."},
            "created_ms": {"type": "integer"},
            "created": _STR,
            "idempotency_key": {
                "type": ["string", "null"],
                "description": "The Idempotency-Key it was added with (`--idempotency-key`); null: none.",
            },
        }
    ),
    "CreditList": _object(
        {
            "count": {"type": "integer", "description": "Credits on this page."},
            "credits": {"type": "array", "items": {"$ref": "#/components/schemas/Credit"}},
            "next": {"type": ["string", "null"], "description": "Cursor of the next page; null on the last."},
        }
    ),
    "Balance": _object(
        {
            "account": _STR,
            "currency": _STR,
            "credits": _MONEY,
            "costs": {**_MONEY, "description": "Every month's from the one of the first credit."},
            "balance": {**_MONEY, "description": "credits - costs"},
            "threshold": {
                "type": ["string", "null"],
                "description": "The account's or the default; null: none.",
            },
            "below_threshold": {"type": "boolean"},
        }
    ),
    "BalanceList": _object(
        {
            "count": {"type": "integer"},
            "balances": {"type": "array", "items": {"$ref": "#/components/schemas/Balance"}},
            "refused": {
                "type": "array",
                "description": "Accounts with credits and no balance: credits in two currencies, or not "
                "in the tariff's.",
                "items": _object({"account": _STR, "error": _STR}),
            },
        }
    ),
}


def paths(
    account: dict[str, Any],
    errors: dict[str, Any],
    error: Any,
    json: Any,
    paged: tuple[list[dict[str, Any]], dict[str, Any]] = ([], {}),
) -> dict[str, Any]:
    """account: the `account` query parameter; errors: the common error answers; error(text) and
    json(schema): openapi's helpers; paged: the paging parameters (limit, cursor) and the Link
    header of a paged list."""
    params, link = paged
    return {
        "/v1/credits": {
            "get": {
                "summary": "Credits added to the caller's accounts, oldest first, a page at a time",
                "parameters": [account, *params],
                "responses": {
                    "200": {
                        "description": "One page of credits.",
                        "headers": link,
                        "content": json("CreditList"),
                    },
                    **errors,
                },
            },
            "post": {
                "summary": "Add a credit to an account (operator credentials only)",
                "parameters": [_IDEMPOTENCY_KEY],
                "requestBody": {"required": True, "content": json("NewCredit")},
                "responses": {
                    "201": {
                        "description": "The credit added; or, for a key and request seen before, "
                        "the credit they added then (nothing added now).",
                        "headers": _REPLAYED,
                        "content": json("Credit"),
                    },
                    "409": error(
                        "The account holds credits in another currency; or, with no tariff, it has "
                        "none and the store's credits are in another currency."
                    ),
                    "422": error(
                        "The Idempotency-Key added another credit (another amount, currency or note)."
                    ),
                    **errors,
                },
            },
        },
        "/v1/balances": {
            "get": {
                "summary": "Credits minus costs of the caller's accounts that have credits",
                "parameters": [account],
                "responses": {
                    "200": {"description": "Balances.", "content": json("BalanceList")},
                    "404": error("This collector rates no tariff: no costs, no balances."),
                    "409": error(
                        "The account asked for holds credits in two currencies, or not in the "
                        "tariff's: it has no balance."
                    ),
                    **errors,
                },
            }
        },
    }
