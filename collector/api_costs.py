"""/v1/costs: each account's costs this month (or a named one), rated live from its usage records
and adjustments under the tariff in force; JSON or CSV. Narrowed to the caller's accounts exactly
as /v1/usage is (api_usage.visible_accounts): naming another account is a 403, and an account
outside the credential's scope is never listed."""

from __future__ import annotations

import time
from collections.abc import Callable

from flask import Flask, Response, jsonify, request

from kvmeter.collector import cost_report
from kvmeter.collector.api_errors import error
from kvmeter.collector.api_params import BadRequest, month_ms, name
from kvmeter.collector.api_usage import visible_accounts
from kvmeter.collector.billing import RatingMemo, month_bounds, months_costs
from kvmeter.collector.billing.reads import CachedFacts
from kvmeter.collector.billing.tariff_file import TariffSource
from kvmeter.collector.store import Store


def register(
    app: Flask, store: Store, tariffs: TariffSource | None, clock: Callable[[], float] = time.time
) -> None:
    facts = CachedFacts(store)
    memo = RatingMemo()  # a page asked again rates only what changed since

    @app.get("/v1/costs")
    def costs() -> Response:
        args = request.args
        fmt = args.get("format", "json")
        if fmt not in ("json", "csv"):
            raise BadRequest("format must be json or csv")
        items = args.get("items", "false")
        if items not in ("true", "false"):
            raise BadRequest("items must be true or false")
        accounts = visible_accounts(name(args.get("account"), "account"))
        now = int(clock() * 1000)
        month = month_ms(args.get("month"), now)
        if items == "true" and (accounts is None or len(accounts) != 1):
            raise BadRequest("items=true lists one account's records: name it with account=")
        if tariffs is None:
            return error(404, "costs are not enabled: the collector has no [billing] tariff_file")
        tariff = tariffs.current  # one tariff for the whole answer, even across a reload
        with store.read() as conn:
            known = facts.get(conn)
        months = months_costs(store, tariff, accounts, now, month_ms=month, facts=known, memo=memo)
        start, end = month_bounds(month)
        if fmt == "csv":
            return Response(cost_report.render_csv(months), mimetype="text/csv")
        body = cost_report.document(months, tariff.currency, start, end, now, items=items == "true")
        return jsonify(body)
