"""The collector's HTTP API: usage as JSON/CSV, CloudStack's listUsageRecords, health, metrics.

Loopback by default; with a token every path but /health needs `Authorization: Bearer <token>`.
CloudStack clients (CloudMonkey, billing tools) can call /client/api with an API key and
CloudStack's request signature (HMAC-SHA1 of the sorted, lower-cased query) instead.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flask import Flask, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from waitress import wasyncore
from waitress.server import create_server

from kvmeter.collector import report
from kvmeter.collector.metrics import Metrics
from kvmeter.collector.store import Store, UsageRow

log = logging.getLogger(__name__)


class BadRequest(ValueError):
    pass


def create_app(
    store: Store,
    *,
    token: str = "",
    metrics: Metrics | None = None,
    cloudstack_keys: Mapping[str, str] | None = None,
    status: Callable[[], dict[str, Any]] | None = None,
) -> Flask:
    """cloudstack_keys: {api key: secret key} accepted on /client/api with CloudStack signing;
    status: the consumer's state for /health (503 while it is failing)."""
    app = Flask("kvmeter.collector")
    registry = metrics.registry if metrics is not None else None
    keys = dict(cloudstack_keys or {})

    @app.before_request
    def _auth() -> Any:
        if not (token or keys) or request.path == "/health":
            return None
        given = request.headers.get("Authorization", "")
        if token and hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return None
        if request.path == "/client/api" and keys:
            problem = cloudstack_signature_problem(request.args.items(multi=True), keys, time.time())
            if problem is None:
                return None
            return _cloudstack_error("api", 401, f"unable to verify user credentials: {problem}")
        return _error(401, "missing or wrong bearer token")

    @app.errorhandler(BadRequest)
    def _bad_request(exc: BadRequest) -> Response:
        return _error(400, str(exc))

    @app.get("/health")
    def health() -> Response:
        try:
            version = store.version()
        except Exception as exc:
            log.warning("health: store unavailable: %s", exc)
            return _error(503, f"store unavailable: {type(exc).__name__}")
        body: dict[str, Any] = {"status": "ok", "schema_version": version}
        if status is not None:
            body["consumer"] = consumer = status()
            if consumer.get("failing"):
                body["status"] = "failing"
                response = jsonify(body)
                response.status_code = 503
                return response
        return jsonify(body)

    @app.get("/metrics")
    def prometheus() -> Response:
        if registry is None:
            return _error(404, "metrics are not enabled")
        return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)

    @app.get("/v1/usage")
    def usage() -> Response:
        args = request.args
        fmt = args.get("format", "json")
        if fmt not in ("json", "csv"):
            raise BadRequest("format must be json or csv")
        rows = _query(
            store,
            _when(args, "start"),
            _when(args, "end"),
            args.get("account"),
            _type(args.get("type")),
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
        since = _when(args, "since")
        until = _when(args, "until") if args.get("until") else 2**62
        rows = store.adjustments(since, until, account=args.get("account"))
        if fmt == "csv":
            return Response(report.render_adjustments(rows, "csv"), mimetype="text/csv")
        return jsonify({"count": len(rows), "adjustments": [report.adjustment_dict(a) for a in rows]})

    @app.get("/client/api")
    def cloudstack_api() -> Response:
        args = {k.lower(): v for k, v in request.args.items()}
        command = args.get("command", "")
        if command != "listUsageRecords":
            return _cloudstack_error(command or "api", 432, f"command {command!r} is not supported")
        try:
            start = report.parse_when(args["startdate"])
            end = report.parse_when(args["enddate"], end_of_day=True)
            if len(args["enddate"].strip()) > 10:
                end += 1000  # yyyy-MM-dd HH:mm:ss names the last second included
            usage_type = _type(args.get("type"))
        except KeyError as exc:
            return _cloudstack_error("listusagerecords", 431, f"missing parameter {exc.args[0]}")
        except (ValueError, BadRequest) as exc:
            return _cloudstack_error("listusagerecords", 431, str(exc))
        resource = args.get("usageid")
        if resource and usage_type is None:
            return _cloudstack_error("listusagerecords", 431, "usageid needs type")
        try:
            page = int(args.get("page", "1"))
            pagesize = int(args.get("pagesize", "0"))
        except ValueError:
            return _cloudstack_error("listusagerecords", 431, "page and pagesize must be integers")
        if page < 1 or pagesize < 0:
            return _cloudstack_error("listusagerecords", 431, "page must be >= 1 and pagesize >= 0")
        rows = _query(store, start, end, args.get("accountid"), usage_type, resource)
        response = report.cloudstack_response(rows)
        if pagesize:  # CloudStack's paging: count stays the total, usagerecord is one page
            body = response["listusagerecordsresponse"]
            body["usagerecord"] = body["usagerecord"][(page - 1) * pagesize : page * pagesize]
        return jsonify(response)

    return app


def cloudstack_signature(params: Iterable[tuple[str, str]], secret: str) -> str:
    """CloudStack's request signature: URL-encode each value (Java's URLEncoder, spaces as
    %20), sort the pairs by lower-cased field, join with &, lower-case, HMAC-SHA1, base64."""
    pairs = sorted(
        (k.lower(), f"{k}={_java_quote(v)}".lower()) for k, v in params if k.lower() != "signature"
    )
    message = "&".join(text for _, text in pairs)
    digest = hmac.new(secret.encode(), message.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def cloudstack_signature_problem(
    params: Iterable[tuple[str, str]], keys: Mapping[str, str], now_s: float
) -> str | None:
    """None when the request is signed by a known key (and, signature version 3, not expired)."""
    items = list(params)
    args = {k.lower(): v for k, v in items}
    secret = keys.get(args.get("apikey", ""))
    if secret is None:
        return "unknown or missing apikey"
    if not hmac.compare_digest(cloudstack_signature(items, secret), args.get("signature", "")):
        return "signature mismatch"
    if args.get("signatureversion") == "3":
        try:
            expires = dt.datetime.strptime(args.get("expires", ""), "%Y-%m-%dT%H:%M:%S%z")
        except ValueError:
            return "signature version 3 needs expires as yyyy-MM-ddTHH:mm:ssZ"
        if expires.timestamp() < now_s:
            return "request expired"
    return None


def _java_quote(value: str) -> str:
    return urllib.parse.quote(value, safe="*-._").replace("~", "%7E")


def _query(
    store: Store, start: int, end: int, account: str | None, usage_type: int | None, resource: str | None
) -> list[UsageRow]:
    if end <= start:
        raise BadRequest("end must be after start")
    return store.usage(start, end, account=account, usage_type=usage_type, resource=resource)


def _when(args: Any, name: str) -> int:
    value = args.get(name)
    if not value:
        raise BadRequest(f"{name} is required (yyyy-MM-dd, ISO 8601 or ms since the epoch)")
    try:
        return report.parse_when(value)
    except ValueError as exc:
        raise BadRequest(f"{name}: {exc}") from None


def _type(value: str | None) -> int | None:
    if value is None or value == "":
        return None
    if not value.isdigit():
        raise BadRequest(f"type must be a usage type id, not {value!r}")
    return int(value)


def _error(status: int, message: str) -> Response:
    response = jsonify({"error": message})
    response.status_code = status
    return response


def _cloudstack_error(command: str, code: int, text: str) -> Response:
    response = jsonify(
        {f"{command.lower()}response": {"errorcode": code, "cserrorcode": 9999, "errortext": text}}
    )
    response.status_code = code
    return response


class ApiServer:
    """A waitress server for the app: run() blocks, close() stops it (tests, the collector)."""

    def __init__(self, app: Flask, host: str = "127.0.0.1", port: int = 8480, threads: int = 4):
        self.server: Any = create_server(
            app, host=host, port=port, threads=threads, clear_untrusted_proxy_headers=True
        )
        self.host = host
        self.port = int(self.server.effective_port)  # type: ignore[union-attr]
        self._running = threading.Event()

    def run(self) -> None:
        self._running.set()
        try:
            self.server.run()
        finally:
            self._running.clear()
            self.server.task_dispatcher.shutdown()

    def close(self) -> None:
        if self._running.is_set():
            # Close every socket from inside the loop thread: the loop ends when its map is empty
            # (closing from here would pull a descriptor out from under select()).
            self.server.trigger.pull_trigger(lambda: wasyncore.close_all(self.server._map))
        else:
            self.server.close()


def serve(
    store: Store,
    host: str,
    port: int,
    *,
    token: str = "",
    metrics: Metrics | None = None,
    cloudstack_keys: Mapping[str, str] | None = None,
    status: Callable[[], dict[str, Any]] | None = None,
) -> ApiServer:
    """Build the server; the caller runs it (in a thread next to the consumer)."""
    if host not in ("127.0.0.1", "::1", "localhost") and not (token or cloudstack_keys):
        log.warning("API listens on %s without a token: anyone who can reach it reads usage", host)
    app = create_app(store, token=token, metrics=metrics, cloudstack_keys=cloudstack_keys, status=status)
    return ApiServer(app, host, port)
