"""Every error the API answers is JSON (CloudStack's shape on /client/api), over real HTTP."""

from __future__ import annotations

import http.client
import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmeter.collector.api import WEBHOOK_MAX_BODY_BYTES, ApiServer, create_app, serve
from kvmeter.collector.api_errors import MAX_BODY_BYTES
from kvmeter.collector.event_shapes import DEFAULT_MAX_EVENT_BYTES
from kvmeter.collector.input_webhook import PATH as WEBHOOK_PATH
from kvmeter.collector.input_webhook import WebhookInput
from kvmeter.collector.store import Store
from tests.api_support import running


def call(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, str, dict, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        text = resp.read().decode()
        return resp.status, resp.getheader("Content-Type", ""), dict(resp.getheaders()), text
    finally:
        conn.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    db = tmp_path / "usage.db"
    store = Store(f"sqlite:///{db}")
    store.migrate()
    server = serve(store, "127.0.0.1", 0)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield server.port, db
    finally:
        server.close()
        thread.join(10)
        store.close()


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/nowhere", 404),
        ("GET", "/v1/usage/../../etc/passwd", 404),
        ("DELETE", "/v1/usage?start=0&end=1", 405),
        ("PUT", "/health", 405),
        ("PROPFIND", "/v1/usage", 405),
        ("GET", "/v1/usage?start=99999999999999999999999&end=1", 400),
        ("GET", "/v1/usage?start=%D9%A1&end=2", 400),  # an Arabic-Indic one
        ("GET", "/v1/usage?start=0&end=1&type=99999999999999999999", 400),
        ("GET", "/v1/usage?start=0&end=1&account=a%00b", 400),
        ("GET", "/v1/adjustments?since=%EF%BC%92%EF%BC%90", 400),  # full-width digits
    ],
)
def test_errors_are_json_with_a_reason(served: tuple[int, Path], method: str, path: str, status: int) -> None:
    got, ctype, headers, body = call(served[0], method, path)
    assert got == status, body
    assert ctype.startswith("application/json")
    assert json.loads(body)["error"]
    if status == 405:
        assert "GET" in headers["Allow"]


def test_cloudstack_errors_keep_cloudstack_shape(served: tuple[int, Path]) -> None:
    port = served[0]
    status, ctype, _, body = call(
        port,
        "GET",
        "/client/api?command=listUsageRecords&startdate=99999999999999999999&enddate=2024-05-14&response=json",
    )
    assert status == 431
    assert "Unable to parse date" in json.loads(body)["listusagerecordsresponse"]["errortext"]
    status, ctype, headers, body = call(port, "DELETE", "/client/api?command=listUsageRecords&response=json")
    assert status == 405
    assert ctype.startswith("application/json")
    assert json.loads(body)["listusagerecordsresponse"]["errorcode"] == 405
    assert "GET" in headers["Allow"]


def test_oversized_bodies_are_413_json(served: tuple[int, Path]) -> None:
    body = b"x" * (MAX_BODY_BYTES + 1)
    for path in ("/v1/usage?start=0&end=1", "/client/api?command=listUsageRecords&response=json", "/health"):
        status, ctype, _, text = call(served[0], "POST", path, body)
        assert status == 413, (path, text)
        assert ctype.startswith("application/json")


def test_an_unexpected_failure_is_logged_and_a_json_500(
    served: tuple[int, Path], caplog: pytest.LogCaptureFixture
) -> None:
    port, db = served
    with sqlite3.connect(db) as conn:  # the store breaks under the running API
        conn.execute("DROP TABLE usage_adjustments")
    status, ctype, _, body = call(port, "GET", "/v1/usage?start=0&end=1")
    assert status == 500
    assert ctype.startswith("application/json")
    assert json.loads(body) == {"error": "internal error (OperationalError)"}
    assert "unexpected error" in caplog.text
    status, ctype, _, body = call(
        port,
        "GET",
        "/client/api?command=listUsageRecords&startdate=2024-05-14&enddate=2024-05-14&response=json",
    )
    assert status == 530
    assert json.loads(body)["listusagerecordsresponse"]["errorcode"] == 530


def test_webhook_deliveries_may_carry_a_whole_event(tmp_path: Path) -> None:
    """The webhook path takes bodies up to twice the default event limit (an oversized event is
    the webhook input's to dead-letter), every other path 64 KiB; past that, a JSON 413."""
    store = Store(f"sqlite:///{tmp_path}/usage.db")
    store.migrate()
    app = create_app(store, webhook=WebhookInput("webhook-secret"))
    with running(ApiServer(app, "127.0.0.1", 0)) as base:
        port = int(base.rsplit(":", 1)[1])
        status, ctype, _, body = call(port, "POST", WEBHOOK_PATH, b"x" * (DEFAULT_MAX_EVENT_BYTES + 1))
        assert status == 401, body  # read whole, then refused for its missing signature
        status, ctype, _, body = call(port, "POST", WEBHOOK_PATH, b"x" * (WEBHOOK_MAX_BODY_BYTES + 1))
        assert status == 413
        assert ctype.startswith("application/json")
    store.close()
