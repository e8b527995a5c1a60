"""kvmeter's own usage API: /v1/usage and /v1/adjustments (JSON, CSV), narrowed to the caller's
accounts (api_auth.current_principal)."""

from __future__ import annotations

from typing import TypeVar

from flask import Flask, Response, jsonify, request

from kvmeter.collector import api_params, report
from kvmeter.collector.api_auth import current_principal
from kvmeter.collector.api_params import BadRequest
from kvmeter.collector.store import Adjustment, Store, UsageRow

Keyed = TypeVar("Keyed", UsageRow, Adjustment)


def register(app: Flask, store: Store) -> None:
    @app.get("/v1/usage")
    def usage() -> Response:
        args = request.args
        fmt = args.get("format", "json")
        if fmt not in ("json", "csv"):
            raise BadRequest("format must be json or csv")
        rows = query(
            store,
            api_params.required_time_ms(args.get("start"), "start"),
            api_params.required_time_ms(args.get("end"), "end"),
            api_params.name(args.get("account"), "account"),
            api_params.usage_type(args.get("type")),
            api_params.name(args.get("resource"), "resource"),
        )
        if fmt == "csv":
            return Response(report.render(rows, "csv"), mimetype="text/csv")
        return jsonify({"count": len(rows), "usage": [report.record_dict(r) for r in rows]})

    @app.get("/v1/adjustments")
    def adjustments() -> Response:
        """Changes to final windows created since a time: what a billing system that already
        took those windows must apply."""
        args = request.args
        fmt = args.get("format", "json")
        if fmt not in ("json", "csv"):
            raise BadRequest("format must be json or csv")
        since = api_params.required_time_ms(args.get("since"), "since")
        until = api_params.optional_time_ms(args.get("until"), "until", default=2**62)
        rows = visible(
            store.adjustments(since, until, account=api_params.name(args.get("account"), "account"))
        )
        if fmt == "csv":
            return Response(report.render_adjustments(rows, "csv"), mimetype="text/csv")
        return jsonify({"count": len(rows), "adjustments": [report.adjustment_dict(a) for a in rows]})


def query(
    store: Store, start: int, end: int, account: str | None, usage_type: int | None, resource: str | None
) -> list[UsageRow]:
    if end <= start:
        raise BadRequest("end must be after start")
    return visible(store.usage(start, end, account=account, usage_type=usage_type, resource=resource))


def visible(rows: list[Keyed]) -> list[Keyed]:
    """The rows of the caller's accounts: a scoped credential never sees another account's."""
    accounts = current_principal().accounts
    return rows if accounts is None else [r for r in rows if r.key.account in accounts]


def parse_type(value: str | None) -> int | None:
    return api_params.usage_type(value)
