"""Credits and balances on the API.

    POST /v1/credits   {"account", "amount": "25.00", "note"?, "currency"?}   operators only
                       [Idempotency-Key: <the caller's id of the credit>]
    GET  /v1/credits?account=&limit=&cursor=                                  the caller's accounts
    GET  /v1/balances?account=                                                the caller's accounts

A credit is in the tariff's currency (a different one is refused); without a tariff it names its
currency, and an account's credits all share the first one's (an account's first takes the
currency of the store's credits: credit_keys.add_once; one whose credits all cancel holds none,
so its next is a first one). A balance is the account's credits
minus its costs (balance_watch.BalanceBook), with its threshold and whether it is below it; an
account whose credits are in two currencies, or not in the tariff's, has none: it is listed under
`refused` with the reason, and asked for alone (`account=`) it is a 409 naming its currencies.
Credits are listed a page at a time as /v1/usage pages (`limit`, `cursor`, `next`, Link), by id.
A POST with an Idempotency-Key adds its credit once (credit_keys): the same key and request again
answer the same 201 and credit (header `Idempotent-Replayed: true`); another request with that
key is a 422, nothing added.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Flask, Response, jsonify, request

from kvmeter.collector import api_params, credit_keys, report
from kvmeter.collector.api_auth import current_principal
from kvmeter.collector.api_errors import error
from kvmeter.collector.api_params import BadRequest
from kvmeter.collector.api_usage import answer_page, next_page, page_limit, visible_accounts
from kvmeter.collector.balance_watch import BalanceBook
from kvmeter.collector.money_input import MAX_NOTE, credit_amount, currency_code
from kvmeter.collector.store import Store
from kvmeter.collector.store import credits as stored


def credit_dict(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "amount": format(row["amount"], "f"), "created": report.iso(row["created_ms"])}


def register(
    app: Flask, store: Store, book: BalanceBook | None, paging: api_params.Paging | None = None
) -> None:
    paging = paging or api_params.Paging()

    @app.post("/v1/credits")
    def add_credit() -> Response:
        who = current_principal()
        if not who.operator:
            return error(403, "only operator credentials may add credits")
        try:
            body = request.get_json(silent=True)
        except RecursionError:  # nested too deep for json.loads; silent=True covers ValueError only
            body = None
        if not isinstance(body, dict):
            raise BadRequest('the body must be a JSON object: {"account": ..., "amount": "25.00"}')
        unknown = sorted(set(body) - {"account", "amount", "note", "currency"})
        if unknown:
            raise BadRequest(f"unknown field(s): {', '.join(unknown)}")
        account = body.get("account")
        if not isinstance(account, str) or api_params.name(account, "account", max_len=64) is None:
            raise BadRequest("account must be the account's uuid")
        note = body.get("note", "")
        if not isinstance(note, str) or len(note) > MAX_NOTE or not note.isprintable():
            raise BadRequest(f"note must be at most {MAX_NOTE} printable characters")
        try:
            amount = credit_amount(body.get("amount"))
            given = None if body.get("currency") is None else currency_code(body["currency"])
            key = request.headers.get("Idempotency-Key")
            key = None if key is None else credit_keys.idempotency_key(key)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        tariff = book.tariff() if book is not None else None
        currency = tariff.currency if tariff is not None else given
        if currency is None:
            raise BadRequest("currency is needed: this collector rates no tariff to take it from")
        if given is not None and given != currency:
            raise BadRequest(f"currency {given} is not the tariff's ({currency})")
        try:
            with store.write() as conn:
                now_ms = int(time.time() * 1000)
                created, replayed = credit_keys.add_once(
                    conn, account, amount, currency, note, who.name, now_ms, key, unguarded=tariff is None
                )
        except credit_keys.CurrencyHeld as exc:
            return error(409, str(exc))
        except credit_keys.KeyReused as exc:
            return error(422, str(exc))
        # A replay answers as the first time did (a client that timed out never saw that answer).
        response = jsonify(credit_dict(created))
        response.status_code = 201
        if replayed:
            response.headers["Idempotent-Replayed"] = "true"
        return response

    @app.get("/v1/credits")
    def list_credits() -> Response:
        args = request.args
        requested = api_params.name(args.get("account"), "account")
        accounts = visible_accounts(requested)
        limit = page_limit(args, paging)
        # Paged, never cut short: an operator's list of every account's top-ups outgrows any one page.
        query = api_params.fingerprint("credits", requested)
        position = api_params.decode_cursor(args.get("cursor"), query, 1)

        def fetch(n: int, at: tuple[int, ...] | None) -> tuple[list[dict[str, Any]], tuple[int, ...] | None]:
            page = stored.list_credits(conn, accounts, n, after_id=at[0] if at else None)
            return page, ((page[-1]["id"],) if page else None)

        with store.read() as conn:
            rows, cursor = next_page(fetch, limit, position, query)
        return answer_page(
            {"count": len(rows), "credits": [credit_dict(r) for r in rows], "next": cursor}, cursor
        )

    @app.get("/v1/balances")
    def balances() -> Response:
        requested = api_params.name(request.args.get("account"), "account")
        accounts = visible_accounts(requested)
        if book is None or book.tariff() is None:
            return error(404, "balances need costs: this collector rates no tariff ([billing] tariff_file)")
        found, refused = book.read(accounts, int(time.time() * 1000))
        if requested in refused:  # never a balance that leaves some of its credits out
            return error(409, refused[requested])
        return jsonify(
            {
                "count": len(found),
                "balances": [
                    {
                        "account": b.account,
                        "currency": b.currency,
                        "credits": format(b.credits, "f"),
                        "costs": format(b.costs, "f"),
                        "balance": format(b.balance, "f"),
                        "threshold": None if b.threshold is None else format(b.threshold, "f"),
                        "below_threshold": b.below,
                    }
                    for b in found
                ],
                "refused": [{"account": a, "error": why} for a, why in sorted(refused.items())],
            }
        )
