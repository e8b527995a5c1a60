"""GET /v1/corrections: what reconciliation against CloudStack's API changed (read-only), with
source and reason; a caller sees only the corrections of the accounts it may read."""

from __future__ import annotations

from flask import Flask, Response, jsonify, request

from kvmeter.collector import api_params, report
from kvmeter.collector.api_usage import visible_accounts
from kvmeter.collector.store import Store, reconciliation

MAX_ROWS = 10_000


def register(app: Flask, store: Store) -> None:
    @app.get("/v1/corrections")
    def corrections() -> Response:
        args = request.args
        start = api_params.optional_time_ms(args.get("start"), "start", default=0)
        end = api_params.optional_time_ms(args.get("end"), "end", default=2**62)
        resource = api_params.name(args.get("resource"), "resource")
        accounts = visible_accounts(api_params.name(args.get("account"), "account"))  # 403 for another's
        with store.read() as conn:
            rows = reconciliation.list_corrections(
                conn, accounts=accounts, resource=resource, start_ms=start, end_ms=end, limit=MAX_ROWS
            )
            names = reconciliation.load_names(conn)
        for row in rows:  # CloudStack's naming: accountid the uuid, account the name
            row["time"] = report.iso(row["time_ms"])
            row["accountid"] = row.pop("account")
            row.update({"account": "", **names.account(row["accountid"])})
        return jsonify({"count": len(rows), "corrections": rows})
