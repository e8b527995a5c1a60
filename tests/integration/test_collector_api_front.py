"""The API's settings through the front door: `kvmeter collector --config FILE`, a real broker."""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness.collector_command import CollectorCommand
from tests.harness.kafka import FAST_GROUP_TOML, Broker, create_topic
from tests.harness.ports import free_port

pytestmark = pytest.mark.broker


class CollectorProcess(CollectorCommand):
    """`kvmeter collector` from a TOML file, its output in a log file."""

    def __init__(
        self,
        tmp_path: Path,
        bootstrap: str,
        api: str,
        kafka_extra: str = "",
        extra: str = "",
        lifecycle_topic: str = "",
    ):
        self.config = tmp_path / "collector.toml"
        self.config.write_text(
            f"""
[store]
url = "sqlite:///{tmp_path}/usage.db"
[kafka]
bootstrap = "{bootstrap}"
measures_topic = "m-{tmp_path.name}"
lifecycle_topic = "{lifecycle_topic or "l-" + tmp_path.name}"
{kafka_extra}
{FAST_GROUP_TOML}[usage]
tick_seconds = 0.5
[api]
{api}
{extra}
"""
        )
        super().__init__(self.config, tmp_path / "collector.log")


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


def wait_until(condition: Callable[[], bool], timeout: float, collector: CollectorProcess) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, collector.log()[-3000:]
        time.sleep(0.5)


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


def kafka_lines(log: str) -> list[str]:
    # `<N>kvmeter.collector.kafka: ...` (journal lines: the log is not a terminal)
    return [line for line in log.splitlines() if "kvmeter.collector.kafka: " in line]


def test_health_turns_degraded_while_the_broker_is_gone_and_kafka_logs_stay_quiet(
    tmp_path: Path, collectors: list[CollectorProcess]
) -> None:
    broker = Broker(log_dir=tmp_path).start()
    topics = (f"m-{tmp_path.name}", f"l-{tmp_path.name}")  # a missing measures topic is degraded too
    for topic in topics:
        create_topic(broker.bootstrap, topic)
    try:
        port = free_port()
        c = CollectorProcess(
            tmp_path, broker.bootstrap, f'listen = "127.0.0.1:{port}"', "degraded_after_seconds = 4"
        )
        collectors.append(c)
        wait_until(lambda: get("127.0.0.1", port, "/health")[1]["consumer"]["broker"]["reachable"], 30, c)
        status, body = get("127.0.0.1", port, "/health")
        assert (status, body["status"]) == (200, "ok")

        broker.stop()
        down_at = time.monotonic()
        lines_before = len(kafka_lines(c.log()))
        wait_until(lambda: get("127.0.0.1", port, "/health")[0] == 503, 30, c)
        status, body = get("127.0.0.1", port, "/health")
        assert body["status"] == "degraded"
        assert body["reason"].startswith("no Kafka broker reachable for")
        assert "(limit 4 s)" in body["reason"]
        assert time.monotonic() - down_at >= 4
        time.sleep(max(0.0, 10 - (time.monotonic() - down_at)))  # 10 s of outage: ~200 lines unlimited
        during = kafka_lines(c.log())[lines_before:]
        assert any("Connect to" in line for line in during), c.log()[-3000:]
        # kvmeter.logs' journal lines (`<N>logger: message`): the log is not a terminal
        assert any(re.match(r"<[0-7]>kvmeter\.collector\.kafka: ", line) for line in during), during
        assert len(during) <= 10, "\n".join(during)

        broker.start()  # memory storage: its topics are gone
        for topic in topics:
            create_topic(broker.bootstrap, topic)
        wait_until(lambda: get("127.0.0.1", port, "/health")[0] == 200, 60, c)
        assert get("127.0.0.1", port, "/health")[1]["status"] == "ok"
    finally:
        broker.stop()
