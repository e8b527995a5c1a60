"""Hostile input on every endpoint, over real HTTP: never a 5xx, always a JSON body (XML where a
CloudStack client asks for it), and a refusal names what it refused."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import pytest

from kvmeter.collector.api import ApiServer, create_app
from kvmeter.collector.api_errors import MAX_BODY_BYTES
from kvmeter.collector.metrics import Metrics
from tests.api_support import filled_store, running

TOKEN = "hostile-test-token"
# Valid values to start from; each case replaces one parameter with a hostile value.
ENDPOINTS: dict[str, dict[str, str]] = {
    "/v1/usage": {"start": "2024-05-14", "end": "2024-05-15", "account": "", "type": "", "resource": "",
                  "format": "json", "limit": "10", "cursor": ""},
    "/v1/adjustments": {"since": "2024-05-14", "until": "2024-05-15", "account": "", "format": "json",
                        "limit": "10", "cursor": ""},
    "/client/api": {"command": "listUsageRecords", "startdate": "2024-05-14", "enddate": "2024-05-15",
                    "type": "", "accountid": "", "usageid": "", "page": "1", "pagesize": "10",
                    "response": "json"},
    "/v1/corrections": {"start": "2024-05-14", "end": "2024-05-15", "account": "", "resource": ""},
    "/v1/openapi.json": {"x": ""},
    "/health": {"x": ""},
    "/metrics": {"x": ""},
}  # fmt: skip
HOSTILE = [
    "9" * 25,  # past every integer column
    "9" * 5000,  # past int()'s digit limit
    "-9223372036854775809",
    "1e308",
    "NaN",
    "١٢٣",  # Arabic-Indic digits
    "１２",  # full-width digits
    "²",
    "0x7fffffff",
    "10000-01-01",
    "0000-00-00",
    "1969-12-31T23:59:59Z",
    "9999-12-31T23:59:59-23:59",
    "2024-02-30",
    "' OR '1'='1",
    "1; DROP TABLE usage_records; --",
    "%' UNION SELECT * FROM stream_marks --",
    "../../../../etc/passwd",
    "..%2F..%2Fetc%2Fpasswd",
    "\x00",
    "a\x00b",
    "\r\nSet-Cookie: x=y",
    "\U0001f4a9" * 50,
    "\ud800",  # a lone surrogate, sent as its UTF-8-ish bytes
    "x" * 20_000,
    "[]",
    '{"$gt": ""}',
]


def request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Authorization": f"Bearer {TOKEN}"})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type", ""), resp.read()
    finally:
        conn.close()


def headers_only(port: int, head: str) -> tuple[int, str, bytes]:
    """Send a request head alone and read the answer (the server refuses before any body). A
    server that answers and closes before reading all we sent may reset the connection under
    the answer: that is the transport, not the answer, so such a try is repeated."""
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            with contextlib.suppress(OSError):  # the server may have answered and closed already
                sock.sendall(head.encode() + b"\r\n")
                sock.shutdown(socket.SHUT_WR)
            resp = http.client.HTTPResponse(sock)
            try:
                resp.begin()
                return resp.status, resp.getheader("Content-Type", ""), resp.read()
            except (ConnectionResetError, http.client.RemoteDisconnected):
                continue
    raise AssertionError("no answer in five tries")


def query(params: dict[str, str]) -> str:
    return urllib.parse.urlencode(params, errors="surrogatepass")


def assert_sane(status: int, ctype: str, body: bytes, what: str) -> None:
    assert status < 500, f"{what}: {status} {body[:300]!r}"
    if ctype.startswith("application/json"):
        doc = json.loads(body)
        if status >= 400:
            text = json.dumps(doc)
            assert "error" in text, f"{what}: {text[:300]}"
    elif ctype.startswith(("text/xml", "application/xml")):
        ET.fromstring(body)
    else:
        assert status < 400, f"{what}: an error that is not JSON: {ctype} {body[:300]!r}"
        plain = ctype.startswith(("text/csv", "text/plain"))
        assert (status == 204 and not body) or plain, f"{what}: {ctype}"


@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    store, _ = filled_store(tmp_path_factory.mktemp("hostile"))
    server = ApiServer(create_app(store, token=TOKEN, metrics=Metrics()), "127.0.0.1", 0)
    with running(server):
        yield server.port
    store.close()


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_hostile_values_in_every_parameter(port: int, path: str) -> None:
    for name in ENDPOINTS[path]:
        for value in HOSTILE:
            params = {k: v for k, v in ENDPOINTS[path].items() if v} | {name: value}
            status, ctype, body = request(port, "GET", f"{path}?{query(params)}")
            assert_sane(status, ctype, body, f"{path} {name}={value[:30]!r}")


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_odd_methods_and_bodies(port: int, path: str) -> None:
    good = f"{path}?{query({k: v for k, v in ENDPOINTS[path].items() if v})}"
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "PROPFIND", "FOO"):
        status, ctype, body = request(port, method, good, b'{"a": 1}')
        if method == "HEAD":  # GET's headers, no body
            assert status < 500, (path, status)
            assert not body
            assert not ctype.startswith("text/html"), (path, ctype)
            continue
        assert_sane(status, ctype, body, f"{method} {path}")
        if method not in ("OPTIONS", "HEAD", "POST"):
            assert status == 405, f"{method} {path}: {status}"
    # Over the app's limit (it answers), then far over the server's (refused from the headers).
    status, ctype, body = request(port, "POST", good, b"\x00" * (MAX_BODY_BYTES + 1))
    assert status == 413
    assert_sane(status, ctype, body, f"oversized POST {path}")
    status, ctype, body = headers_only(
        port, f"POST {good} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n"
    )
    assert status == 413
    assert_sane(status, ctype, body, f"a declared 1 GB POST {path}")


@pytest.mark.parametrize(
    "path",
    [
        "/../../etc/passwd",
        "/v1/../../etc/passwd",
        "/v1/usage/..%2f..%2fetc%2fpasswd",
        "/v1/%2e%2e/%2e%2e/etc/passwd",
        "/static/../collector/api.py",
        "/v1/usage%00.json",
        "/v1/" + "a" * 5000,
        "/%F0%9F%92%A9",
        "/v1/usage;drop",
        "//v1//usage",
    ],
)
def test_paths_that_are_not_routes_are_json_404(port: int, path: str) -> None:
    status, ctype, body = request(port, "GET", path)
    assert status in (400, 404), f"{path}: {status}"
    assert_sane(status, ctype, body, path)


def test_repeated_and_unknown_parameters(port: int) -> None:
    path = "/v1/usage?start=2024-05-14&start=99999999999999999999&end=2024-05-15&bogus=%00&type=1&type=x"
    status, ctype, body = request(port, "GET", path)
    assert_sane(status, ctype, body, path)
    status, ctype, body = request(port, "GET", "/v1/usage?" + "&".join(f"k{i}=v" for i in range(5000)))
    assert_sane(status, ctype, body, "5000 parameters")


@pytest.mark.parametrize(
    "head",
    [
        "GET /v1/usage HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n",  # not a length
        "GET /v1/usage HTTP/1.1\r\nHost: x\r\nX-Big: " + "y" * 70_000 + "\r\n",  # a head over 64 KiB
        "GET /v1/usage HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked, x\r\n",
        "GET /v1/usage HTTP/9.9\r\nHost: x\r\n",
    ],
)
def test_malformed_http_is_refused_with_a_json_body(port: int, head: str) -> None:
    status, ctype, body = headers_only(port, head)
    assert 400 <= status < 500, (status, body[:200])
    assert ctype.startswith("application/json"), (status, ctype, body[:200])
    assert json.loads(body)["error"]
