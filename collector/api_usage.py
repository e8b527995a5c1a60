"""kvmeter's own usage API: /v1/usage and /v1/adjustments (JSON, CSV), a page at a time, and
the OpenAPI description of it all at /v1/openapi.json.

Pages: `limit` records (default and maximum in api_params), in a stable order; `next` in the
JSON body (and a Link header, for CSV too) is the opaque cursor of the following page, null on
the last. Every read is narrowed to the caller's accounts (api_auth.current_principal); naming
an account outside them is a 403.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import Forbidden

from kvmeter.collector import api_params, openapi, report
from kvmeter.collector.api_auth import current_principal
from kvmeter.collector.api_params import BadRequest
from kvmeter.collector.input_webhook import PATH as WEBHOOK_PATH
from kvmeter.collector.store import Adjustment, Store, UsageRow
from kvmeter.collector.store.pages import UsageFilter, page_usage

Row = TypeVar("Row")
Position = tuple[int, ...]  # where a page ends: what a cursor holds


def register(app: Flask, store: Store, paging: api_params.Paging | None = None) -> None:
    paging = paging or api_params.Paging()

    @app.get("/v1/openapi.json")
    def openapi_document() -> Response:
        webhook = any(rule.rule == WEBHOOK_PATH for rule in app.url_map.iter_rules())
        return jsonify(openapi.document(webhook=webhook, paging=paging))

    @app.get("/v1/usage")
    def usage() -> Response:
        args = request.args
        fmt = _format(args)
        start = api_params.required_time_ms(args.get("start"), "start")
        end = api_params.required_time_ms(args.get("end"), "end")
        if end <= start:
            raise BadRequest("end must be after start")
        requested = api_params.name(args.get("account"), "account")
        flt = UsageFilter(
            start_ms=start,
            end_ms=end,
            accounts=visible_accounts(requested),
            usage_type=api_params.usage_type(args.get("type")),
            resource=api_params.name(args.get("resource"), "resource"),
        )
        limit = page_limit(args, paging)
        query = api_params.fingerprint("usage", start, end, requested, flt.usage_type, flt.resource)
        position = api_params.decode_cursor(args.get("cursor"), query, 2)

        def fetch(n: int, at: tuple[int, ...] | None) -> tuple[list[UsageRow], tuple[int, ...] | None]:
            after = (at[0], at[1]) if at else None  # (window start, record id)
            page = page_usage(conn, flt, limit=n, after=after)
            return page.rows, page.after

        with store.read() as conn:
            rows, cursor = next_page(fetch, limit, position, query)
        if fmt == "csv":
            return answer_page(report.render(rows, "csv"), cursor)
        return answer_page(
            {"count": len(rows), "usage": [report.record_dict(r) for r in rows], "next": cursor}, cursor
        )

    @app.get("/v1/adjustments")
    def adjustments() -> Response:
        """Changes to final windows created since a time: what a billing system that already
        took those windows must apply."""
        args = request.args
        fmt = _format(args)
        since = api_params.required_time_ms(args.get("since"), "since")
        until = api_params.optional_time_ms(args.get("until"), "until", default=2**62)
        requested = api_params.name(args.get("account"), "account")
        accounts = visible_accounts(requested)
        limit = page_limit(args, paging)
        # after: the last seq a poller took (the last page gives no cursor; its last seq does)
        after = api_params.optional_integer(args.get("after"), "after", default=0, maximum=2**63 - 1)
        query = api_params.fingerprint("adjustments", since, until, requested, after)
        position = api_params.decode_cursor(args.get("cursor"), query, 1) or (after,)

        def fetch(n: int, at: tuple[int, ...] | None) -> tuple[list[Adjustment], tuple[int, ...] | None]:
            page = store.adjustments(
                since, until, accounts=accounts, limit=n, after_seq=at[0] if at else None
            )
            return page, ((page[-1].seq,) if page else None)

        rows, cursor = next_page(fetch, limit, position, query)
        if fmt == "csv":
            return answer_page(report.render_adjustments(rows, "csv"), cursor)
        items = [report.adjustment_dict(a) for a in rows]
        return answer_page({"count": len(rows), "adjustments": items, "next": cursor}, cursor)


def visible_accounts(requested: str | None) -> frozenset[str] | None:
    """The accounts a read may return (None: every account): the one asked for, if the caller
    may see it, else all the caller may see. Asking for another account is a 403.
    A cursor's fingerprint takes the account asked for, not this set: a domain's accounts grow
    while a client pages (every page is narrowed again), and its cursor must go on working."""
    scope = current_principal().accounts
    if requested is None:
        return scope
    if scope is not None and requested not in scope:
        raise Forbidden(f"this credential may not read account {requested!r}")
    return frozenset({requested})


def _format(args: Mapping[str, str]) -> str:
    fmt = args.get("format", "json")
    if fmt not in ("json", "csv"):
        raise BadRequest("format must be json or csv")
    return fmt


def page_limit(args: Mapping[str, str], paging: api_params.Paging) -> int:
    return api_params.optional_integer(
        args.get("limit"), "limit", default=paging.page_size, minimum=1, maximum=paging.max_page_size
    )


def next_page(
    fetch: Callable[[int, Position | None], tuple[list[Row], Position | None]],
    limit: int,
    position: Position | None,
    query: str,
) -> tuple[list[Row], str | None]:
    """One page from `position` on, and the cursor of the next one: None when this page is the
    last (one more row is looked for past a full page, so no client ever gets an empty last page)."""
    rows, last = fetch(limit, position)
    if len(rows) < limit or last is None or not fetch(1, last)[0]:
        return rows, None
    return rows, api_params.encode_cursor(query, last)


def answer_page(body: str | dict[str, Any], cursor: str | None) -> Response:
    """JSON (a dict) or CSV (text), with a Link header to the next page: the same query with
    the new cursor."""
    response = jsonify(body) if isinstance(body, dict) else Response(body, mimetype="text/csv")
    if cursor is not None:
        params: list[tuple[str, Any]] = [(k, v) for k, v in request.args.items(multi=True) if k != "cursor"]
        query = urllib.parse.urlencode([*params, ("cursor", cursor)])
        response.headers["Link"] = f'<{request.path}?{query}>; rel="next"'
    return response
