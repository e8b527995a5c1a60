"""SIGHUP to `kvmeter collector` started from a TOML file, a real broker: router owners and the
config file's credentials read again, a broken file refused (the old one kept, the log says why,
a metric counts it) and the process going on with its state."""

from __future__ import annotations

import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvmeter.collector.store import Store
from tests.collector_support import ACCT_A, ACCT_B, HOUR, T0, M, Stream, wait_for
from tests.harness.kafka import FAST_GROUP_TOML
from tests.harness.ports import free_port, wait_for_port
from tests.integration.test_consume_live import produce

pytestmark = pytest.mark.broker

TOKEN_OLD, TOKEN_NEW = "operator-token-old-0123456789", "operator-token-new-0123456789"
ROUTER = "r-5-VM"


def config_text(tmp_path: Path, bootstrap: str, topics: tuple[str, str], port: int, token: str) -> str:
    return f"""
[store]
url = "sqlite:///{tmp_path}/usage.db"
[kafka]
bootstrap = "{bootstrap}"
measures_topic = "{topics[0]}"
lifecycle_topic = "{topics[1]}"
group = "g-{topics[0]}"
{FAST_GROUP_TOML}[usage]
tick_seconds = 0.5
router_owners_file = "routers.toml"
[api]
listen = "127.0.0.1:{port}"
token = "{token}"
"""


def status(port: int, token: str) -> int:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        err.close()
        return int(err.code)


def metrics(port: int, token: str) -> str:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return str(resp.read().decode())


@pytest.fixture
def running() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)


def test_sighup_reloads_router_owners_and_credentials(
    kafka_bootstrap: str,
    unique_topic: Callable[..., str],
    tmp_path: Path,
    running: list[subprocess.Popen[bytes]],
) -> None:
    topics = (unique_topic("measures"), unique_topic("cloudstack"))
    port = free_port()
    config = tmp_path / "collector.toml"
    config.write_text(config_text(tmp_path, kafka_bootstrap, topics, port, TOKEN_OLD))
    routers = tmp_path / "routers.toml"
    routers.write_text(f'"{ROUTER}" = "{ACCT_A}"\n')
    log_path = tmp_path / "collector.log"
    with open(log_path, "wb") as out:
        running.append(
            subprocess.Popen(
                [sys.executable, "-m", "kvmeter", "collector", "--config", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        )
    proc = running[0]

    def logs() -> str:
        return log_path.read_text(errors="replace")

    wait_for_port("127.0.0.1", port, 30, logs())
    store = Store(f"sqlite:///{tmp_path}/usage.db")
    stream = Stream("stream-r5", "h1")

    def send(hour: int, nbytes: int) -> None:
        """Bytes of the router's public NIC, no lifecycle and no owner hint: the map decides."""
        start = T0 + hour * HOUR
        measure = M(
            start, start + 60_000, nbytes, instance="", domain=ROUTER, mac="02:00:52:00:00:05", address=""
        )
        produce(kafka_bootstrap, topics[0], [(b"h1", stream.batch([measure]))])

    def by_account() -> dict[str, int]:
        totals: dict[str, int] = {}
        for key, quantity in store.net_usage().items():
            totals[key.account] = totals.get(key.account, 0) + quantity
        return totals

    try:
        send(0, 1000)
        wait_for(lambda: by_account() == {ACCT_A: 1000}, 60, "the first owner billed", logs)

        # A new owner in the router file: later measures are its own, earlier ones stay.
        routers.write_text(f'"{ROUTER}" = "{ACCT_B}"\n')
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reloaded router owners: 1 router owner(s)" in logs(), 30, "the reload", logs)
        send(1, 2000)
        wait_for(lambda: by_account() == {ACCT_A: 1000, ACCT_B: 2000}, 60, "the new owner billed", logs)

        # A broken router file: the map in force stays, the log says why, the process runs on.
        routers.write_text(f'"{ROUTER}" = [\n')
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload of router owners refused" in logs(), 30, "the refusal", logs)
        assert "routers.toml is not valid toml" in logs()
        send(2, 4000)
        wait_for(lambda: by_account() == {ACCT_A: 1000, ACCT_B: 6000}, 60, "the kept owner billed", logs)
        assert proc.poll() is None
        assert 'kvmeter_reload_failures_total{what="router owners"} 1.0' in metrics(port, TOKEN_OLD)

        # The config file's own token changed: the old one is refused from now on.
        routers.write_text(f'"{ROUTER}" = "{ACCT_B}"\n')
        assert status(port, TOKEN_OLD) == 200
        assert status(port, TOKEN_NEW) == 401
        config.write_text(config_text(tmp_path, kafka_bootstrap, topics, port, TOKEN_NEW))
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: status(port, TOKEN_NEW) == 200, 30, "the new token accepted", logs)
        assert status(port, TOKEN_OLD) == 401
        assert "reloaded credentials: 1 token(s), 0 key pair(s)" in logs()

        # A config file broken in its [api] section: the credentials in force stay.
        config.write_text(config_text(tmp_path, kafka_bootstrap, topics, port, TOKEN_OLD) + "bogus = 1\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload of credentials refused" in logs(), 30, "the refusal", logs)
        assert "api.bogus: unknown key" in logs()
        assert status(port, TOKEN_NEW) == 200
        assert status(port, TOKEN_OLD) == 401
        assert 'kvmeter_reload_failures_total{what="credentials"} 1.0' in metrics(port, TOKEN_NEW)
        assert proc.poll() is None
    finally:
        store.close()
    proc.terminate()
    assert proc.wait(30) == 0, logs()
    assert "Traceback" not in logs()
