"""The collector's HTTP API: usage as JSON/CSV, CloudStack's listUsageRecords, health, metrics.

Loopback by default. Every path but /health needs a credential (api_auth) once one exists:
`Authorization: Bearer <token>`, or on /client/api an API key and CloudStack's request
signature (HMAC-SHA1 of the sorted, lower-cased query and form fields), as CloudMonkey and
billing tools send them.
Routes live beside this module: api_usage (/v1), api_cloudstack (/client/api), input_webhook
(CloudStack's webhook deliveries, signed with the webhook's own key); who is asking is api_auth's.
"""

from __future__ import annotations

import json
import logging
import resource
import threading
from collections.abc import Callable, Mapping
from typing import Any

from flask import Flask, Response, g, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.server import create_server
from waitress.task import ErrorTask

from kvmeter.collector import (
    api_cloudstack,
    api_corrections,
    api_costs,
    api_credits,
    api_dead_letters,
    api_errors,
    api_usage,
)
from kvmeter.collector.api_auth import Authenticator, Principal, is_loopback, require_credentials
from kvmeter.collector.api_errors import cloudstack_error, error, request_values
from kvmeter.collector.api_params import Paging
from kvmeter.collector.balance_watch import BalanceBook
from kvmeter.collector.billing.tariff_file import TariffSource
from kvmeter.collector.credentials import CredentialSource, operator_credentials
from kvmeter.collector.event_shapes import DEFAULT_MAX_EVENT_BYTES
from kvmeter.collector.input_webhook import PATH as WEBHOOK_PATH
from kvmeter.collector.input_webhook import WebhookInput
from kvmeter.collector.metrics import Metrics
from kvmeter.collector.model import Settings
from kvmeter.collector.redrive import Redriver
from kvmeter.collector.store import Store
from kvmeter.collector.store.credentials import MintedCredentials
from kvmeter.log_limit import limited_logger

log = logging.getLogger(__name__)
# Why a request was refused: a line per reason a minute, so a flood of bad requests cannot fill the log.
REFUSALS_LOG = limited_logger("kvmeter.collector.api.refusals", 60.0)
# ApiServlet's text for a request it cannot authenticate (an unknown key, a bad signature, ...)
CLOUDSTACK_UNAUTHORIZED = "unable to verify user credentials and/or request signature"


def create_app(
    store: Store,
    *,
    token: str = "",
    metrics: Metrics | None = None,
    cloudstack_keys: Mapping[str, str] | None = None,
    status: Callable[[], dict[str, Any]] | None = None,
    auth: Authenticator | None = None,
    webhook: WebhookInput | None = None,
    settings: Settings | None = None,
    tariffs: TariffSource | None = None,
    balances: BalanceBook | None = None,
    paging: Paging | None = None,
) -> Flask:
    """auth: who may ask (default: the operator token and {api key: secret key} given here, the
    credentials minted in the store, anyone while there is none); status: the consumer's state
    for /health (503 while it is failing); settings: the collector's, which dead-letter retries
    run under (none: no retries over the API); tariffs: the tariff costs are rated under (none:
    /v1/costs says costs are not enabled); balances: credits minus costs for /v1/balances
    (none: that route says costs are not enabled; /v1/credits works all the same); paging: the
    page sizes ([api] of the config)."""
    app = Flask("kvmeter.collector", static_folder=None)  # no /static route: nothing to serve
    registry = metrics.registry if metrics is not None else None
    if auth is None:
        auth = authenticator(store, CredentialSource(operator_credentials(token, cloudstack_keys)))
    api_errors.install(app, {WEBHOOK_PATH: WEBHOOK_MAX_BODY_BYTES})

    @app.before_request
    def _auth() -> Any:
        if request.path in ("/health", WEBHOOK_PATH):  # the webhook checks CloudStack's own signature
            return None
        # CloudStack signs every parameter, the query's and a POST form's alike.
        who = auth.authenticate(request.path, request.headers.get("Authorization", ""), request_values())
        if isinstance(who, Principal):
            if request.path == "/metrics" and not who.operator:
                return error(403, "metrics are the operator's: they count every account's bytes")
            g.principal = who
            return None
        if request.path == "/client/api":
            # CloudStack's ApiServlet answers every refusal alike: its text, errorcode 401 and no
            # cserrorcode. Why goes to the log only (a fixed text: never a key or a signature).
            REFUSALS_LOG.info("/client/api from %s refused: %s", request.remote_addr, who.reason)
            command = request.values.get("command", "")
            return cloudstack_error(command, 401, CLOUDSTACK_UNAUTHORIZED, cs_code=None)
        return error(401, who.reason)

    if metrics is not None:
        count_response = metrics.api_responses

        @app.after_request
        def _count(response: Response) -> Response:  # error handlers' responses pass here too
            route = request.url_rule.rule if request.url_rule is not None else "unmatched"
            count_response.labels(route, str(response.status_code)).inc()
            return response

    @app.get("/health")
    def health() -> Response:
        try:
            version = store.version()
        except Exception as exc:
            log.warning("health: store unavailable: %s", exc)
            response = jsonify({"status": "failing", "reason": f"store unavailable: {type(exc).__name__}"})
            response.status_code = 503
            return response
        body: dict[str, Any] = {"status": "ok", "schema_version": version}
        if status is not None:
            body["consumer"] = consumer = status()
            # failing: a store write being retried; degraded: no broker reachable for too long.
            for problem in ("failing", "degraded"):
                if consumer.get(problem):
                    body["status"] = problem
                    body["reason"] = consumer[problem]
                    response = jsonify(body)
                    response.status_code = 503
                    return response
        return jsonify(body)

    @app.get("/metrics")
    def prometheus() -> Response:
        if registry is None:
            return error(404, "metrics are not enabled")
        return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)

    if webhook is not None:
        webhook.register(app)
    paging = paging or Paging()
    api_usage.register(app, store, paging)
    api_cloudstack.register(app, store, paging.cloudstack_page_size)
    api_corrections.register(app, store, paging)
    api_dead_letters.register(app, store, None if settings is None else Redriver(store, settings))
    api_costs.register(app, store, tariffs)
    api_credits.register(app, store, balances, paging)

    return app


# Idle and slow clients hold a connection, never a worker thread (waitress reads a whole request
# before a thread serves it): these bound how many connections they can hold and for how long.
CONNECTION_LIMIT = 1000
IDLE_TIMEOUT_S = 15  # a connection that sends nothing for this long is closed
MAX_HEADER_BYTES = 64 * 1024
# Webhook deliveries are whole events: room for one past the default event limit, which the
# webhook input dead-letters with its bytes rather than the HTTP layer refusing it.
WEBHOOK_MAX_BODY_BYTES = 2 * DEFAULT_MAX_EVENT_BYTES
MAX_BODY_BYTES = WEBHOOK_MAX_BODY_BYTES + 64 * 1024  # waitress's own, past the app's (a JSON 413)


def connection_limit(wanted: int = CONNECTION_LIMIT) -> int:
    """wanted, or fewer when the process may not open that many descriptors (the store, Kafka
    and the listening socket need theirs)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(16, min(wanted, soft - 128))


class _JsonErrorTask(ErrorTask):
    """waitress's own refusals (a body or headers over the limit, malformed HTTP) as JSON bodies,
    like the app's."""

    def execute(self) -> None:
        request: Any = self.request  # the stubs type it as the error itself
        err = request.error
        body = json.dumps({"error": f"{err.reason}: {err.body}"}).encode()
        # What waitress refuses is the request's fault, whatever its code: an unsupported
        # transfer coding (501) is a 400 here, as no input gets a 5xx.
        code, reason = (err.code, err.reason) if err.code < 500 else (400, "Bad Request")
        self.status = f"{code} {reason}"
        self.response_headers = [*self.response_headers, ("Content-Type", "application/json")]
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class _JsonErrorChannel(HTTPChannel):
    error_task_class = _JsonErrorTask


class ApiServer:
    """A waitress server for the app: run() blocks, close() stops it (tests, the collector)."""

    def __init__(
        self,
        app: Flask,
        host: str = "127.0.0.1",
        port: int = 8480,
        threads: int = 4,
        *,
        max_connections: int = CONNECTION_LIMIT,
        idle_timeout_s: int = IDLE_TIMEOUT_S,
    ):
        self.server: Any = create_server(
            app,
            host=host,
            port=port,
            threads=threads,
            clear_untrusted_proxy_headers=True,
            connection_limit=connection_limit(max_connections),
            channel_timeout=idle_timeout_s,
            cleanup_interval=max(1, min(idle_timeout_s // 4, 5)),
            asyncore_use_poll=True,  # select() cannot watch descriptors past 1024
            max_request_header_size=MAX_HEADER_BYTES,
            max_request_body_size=MAX_BODY_BYTES,
            expose_tracebacks=False,
        )
        self.server.channel_class = _JsonErrorChannel  # type: ignore[union-attr]
        self.host = host
        self.port = int(self.server.effective_port)  # type: ignore[union-attr]
        self._running = threading.Event()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

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
            # (closing from here would pull a descriptor out from under select()). The loop runs
            # queued thunks on any wake-up (a worker's too), and this one closes the trigger
            # itself: queue and write under the trigger's lock (pull_trigger would write after
            # releasing it), so the pipe is never written after the thunk closed it.
            trigger = self.server.trigger
            with trigger.lock:
                trigger.thunks.append(lambda: wasyncore.close_all(self.server._map))
                trigger._physical_pull()
        else:
            self.server.close()


def authenticator(store: Store, configured: CredentialSource, *, loopback: bool = True) -> Authenticator:
    return Authenticator(configured, MintedCredentials(store), anonymous=loopback)


def serve(
    store: Store,
    host: str,
    port: int,
    *,
    token: str = "",
    metrics: Metrics | None = None,
    cloudstack_keys: Mapping[str, str] | None = None,
    credentials: CredentialSource | None = None,
    status: Callable[[], dict[str, Any]] | None = None,
    webhook: WebhookInput | None = None,
    settings: Settings | None = None,
    tariffs: TariffSource | None = None,
    balances: BalanceBook | None = None,
    paging: Paging | None = None,
) -> ApiServer:
    """Build the server; the caller runs it (in a thread next to the consumer). credentials:
    the configured ones (default: token and cloudstack_keys, operator-wide). Raises
    NoCredentials for a non-loopback address while no credential exists, configured or minted."""
    if credentials is None:
        credentials = CredentialSource(operator_credentials(token, cloudstack_keys))
    auth = authenticator(store, credentials, loopback=is_loopback(host))
    require_credentials(host, has_credentials=auth.has_credentials())
    app = create_app(
        store,
        metrics=metrics,
        status=status,
        auth=auth,
        webhook=webhook,
        settings=settings,
        tariffs=tariffs,
        balances=balances,
        paging=paging,
    )
    return ApiServer(app, host, port)
