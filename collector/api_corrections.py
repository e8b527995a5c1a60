"""GET /v1/corrections: what reconciliation against CloudStack's API changed (read-only), with
source and reason, a page at a time as /v1/usage pages (`limit`, `cursor`, `next`); a caller
sees only the corrections of the accounts it may read."""

from __future__ import annotations

from typing import Any

from flask import Flask, Response, request

from kvmeter.collector import api_params, report
from kvmeter.collector.api_usage import (
    Position,
    answer_page,
    next_page,
    page_limit,
    visible_accounts,
)
from kvmeter.collector.store import Store, reconciliation
from kvmeter.collector.store.correction_pages import page_corrections

END_MS = 2**62  # no end given: every correction from start on


def register(app: Flask, store: Store, paging: api_params.Paging | None = None) -> None:
    paging = paging or api_params.Paging()

    @app.get("/v1/corrections")
    def corrections() -> Response:
        args = request.args
        start = api_params.optional_time_ms(args.get("start"), "start", default=0)
        end = api_params.optional_time_ms(args.get("end"), "end", default=END_MS)
        resource = api_params.name(args.get("resource"), "resource")
        requested = api_params.name(args.get("account"), "account")
        accounts = visible_accounts(requested)  # 403 for another's
        limit = page_limit(args, paging)
        query = api_params.fingerprint("corrections", start, end, requested, resource)
        position = api_params.decode_cursor(args.get("cursor"), query, 2)

        def fetch(n: int, at: Position | None) -> tuple[list[dict[str, Any]], Position | None]:
            after = (at[0], at[1]) if at else None
            return page_corrections(
                conn, accounts=accounts, resource=resource, start_ms=start, end_ms=end, limit=n, after=after
            )

        with store.read() as conn:
            rows, cursor = next_page(fetch, limit, position, query)
            names = reconciliation.load_names(conn)
        for row in rows:  # CloudStack's naming: accountid the uuid, account the name
            row["time"] = report.iso(row["time_ms"])
            row["accountid"] = row.pop("account")
            row.update({"account": "", **names.account(row["accountid"])})
        return answer_page({"count": len(rows), "corrections": rows, "next": cursor}, cursor)
