"""Slow and idle clients cannot lock others out of the API (real sockets, the real server)."""

from __future__ import annotations

import contextlib
import http.client
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmeter.collector.api import ApiServer, create_app
from kvmeter.collector.store import Store
from tests.api_support import running


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(f"sqlite:///{tmp_path}/usage.db")
    store.migrate()
    yield store
    store.close()


@contextlib.contextmanager
def half_open(port: int, n: int) -> Iterator[list[socket.socket]]:
    """n connections that each send the start of a request and then nothing."""
    socks = []
    try:
        for _ in range(n):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET /v1/usage?start=0&end=1 HTTP/1.1\r\nHost: x\r\n")
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def health(port: int, timeout: float = 10) -> tuple[int, float]:
    began = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        resp.read()
        return resp.status, time.monotonic() - began
    finally:
        conn.close()


def test_200_half_open_connections_do_not_keep_a_request_waiting(store: Store) -> None:
    server = ApiServer(create_app(store), "127.0.0.1", 0)
    with running(server), half_open(server.port, 200):
        status, took = health(server.port)
        assert status == 200
        assert took < 3, f"a request behind 200 idle connections took {took:.1f}s"


def test_idle_connections_past_the_limit_are_closed_and_free_their_slots(store: Store) -> None:
    server = ApiServer(create_app(store), "127.0.0.1", 0, max_connections=20, idle_timeout_s=2)
    port = server.port
    with running(server), half_open(port, 20) as socks:
        began = time.monotonic()
        for sock in socks:  # the server hangs up on every idle one
            sock.settimeout(15)
            assert sock.recv(1024) == b""
        assert time.monotonic() - began < 12
        assert health(port)[0] == 200
