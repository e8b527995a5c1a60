"""kvmeter's own usage API: /v1/usage and /v1/adjustments (JSON, CSV)."""

from __future__ import annotations

from typing import Any

from flask import Flask, Response, jsonify, request

from kvmeter.collector import report
from kvmeter.collector.api_errors import BadRequest
from kvmeter.collector.store import Store, UsageRow


def register(app: Flask, store: Store) -> None:
    @app.get("/v1/usage")
    def usage() -> Response:
        args = request.args
        fmt = args.get("format", "json")
        if fmt not in ("json", "csv"):
            raise BadRequest("format must be json or csv")
        rows = query(
            store,
            parse_when(args, "start"),
            parse_when(args, "end"),
            args.get("account"),
            parse_type(args.get("type")),
            args.get("resource"),
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
        since = parse_when(args, "since")
        until = parse_when(args, "until") if args.get("until") else 2**62
        rows = store.adjustments(since, until, account=args.get("account"))
        if fmt == "csv":
            return Response(report.render_adjustments(rows, "csv"), mimetype="text/csv")
        return jsonify({"count": len(rows), "adjustments": [report.adjustment_dict(a) for a in rows]})


def query(
    store: Store, start: int, end: int, account: str | None, usage_type: int | None, resource: str | None
) -> list[UsageRow]:
    if end <= start:
        raise BadRequest("end must be after start")
    return store.usage(start, end, account=account, usage_type=usage_type, resource=resource)


def parse_when(args: Any, name: str) -> int:
    value = args.get(name)
    if not value:
        raise BadRequest(f"{name} is required (yyyy-MM-dd, ISO 8601 or ms since the epoch)")
    try:
        return report.parse_when(value)
    except ValueError as exc:
        raise BadRequest(f"{name}: {exc}") from None


def parse_type(value: str | None) -> int | None:
    if value is None or value == "":
        return None
    if not value.isdigit():
        raise BadRequest(f"type must be a usage type id, not {value!r}")
    return int(value)
