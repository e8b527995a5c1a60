"""The API's settings through the front door: `kvmeter collector --config FILE`, a real broker."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.broker


class CollectorProcess:
    """`kvmeter collector` from a TOML file, its output in a log file."""

    def __init__(self, tmp_path: Path, bootstrap: str, api: str, extra: str = ""):
        self.config = tmp_path / "collector.toml"
        self.config.write_text(
            f"""
[store]
url = "sqlite:///{tmp_path}/usage.db"
[kafka]
bootstrap = "{bootstrap}"
measures_topic = "m-{tmp_path.name}"
lifecycle_topic = "l-{tmp_path.name}"
[usage]
tick_seconds = 0.5
[api]
{api}
{extra}
"""
        )
        self.log_path = tmp_path / "collector.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kvmeter", "collector", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def collectors() -> Iterator[list[CollectorProcess]]:
    started: list[CollectorProcess] = []
    yield started
    for c in started:
        c.stop()


def get(host: str, port: int, path: str, timeout: float = 30) -> tuple[int, dict]:
    """GET once the API listens (it starts with the collector)."""
    deadline = time.monotonic() + timeout
    while True:
        conn = http.client.HTTPConnection(host, port, timeout=5)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
        finally:
            conn.close()


def test_the_api_listens_on_ipv6_loopback(
    kafka_bootstrap: str, tmp_path: Path, collectors: list[CollectorProcess]
) -> None:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        port = s.getsockname()[1]
    collectors.append(c := CollectorProcess(tmp_path, kafka_bootstrap, f'listen = "[::1]:{port}"'))
    status, body = get("::1", port, "/health")
    assert status == 200, c.log()
    assert body["status"] == "ok"
    assert "API on http://[::1]:" in c.log()


@pytest.mark.parametrize(
    ("listen", "says"),
    [
        ("127.0.0.1:99999", "api.listen: port '99999' is not 1-65535"),
        ("::1:8480", "api.listen: '::1:8480': an IPv6 address goes in brackets"),
    ],
)
def test_a_bad_listen_address_stops_the_collector_with_a_clear_error(
    kafka_bootstrap: str, tmp_path: Path, collectors: list[CollectorProcess], listen: str, says: str
) -> None:
    collectors.append(c := CollectorProcess(tmp_path, kafka_bootstrap, f'listen = "{listen}"'))
    assert c.proc.wait(30) != 0
    assert says in c.log()
    assert "API on" not in c.log()
