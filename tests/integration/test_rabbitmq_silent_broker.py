"""The collector's RabbitMQ input against a broker that accepts the TCP connection and never
answers (a node still booting or overloaded, a load balancer whose backend is down): pika's
BlockingConnection waits for it up to its own timeouts (socket 10 s, stack 15 s) each attempt,
and that wait must not hold the collector's loop (Kafka's measures, the tick, SIGHUP, shutdown)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from kvmeter.collector.config import RabbitConfig
from kvmeter.collector.feed import Feeder
from kvmeter.collector.input_rabbitmq import RabbitInput
from kvmeter.collector.inputs import MEASURES, Delivery
from kvmeter.collector.metrics import Metrics
from kvmeter.collector.model import Outcome, Record, Settings
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store
from tests.collector_support import HOUR, MIN, T0, Clock, M, Stream, wait_for
from tests.harness.ports import free_port, wait_for_port


class OneBatch:
    """A measures input (as Kafka's, polled last: it waits) with one batch of bytes to deliver."""

    def __init__(self) -> None:
        self.value = Stream("stream-1").batch([M(T0, T0 + MIN, 1000)])
        self.acked = threading.Event()
        self.sent = False

    def start(self) -> None:
        pass

    def poll(self, timeout: float, *, measures: bool = True) -> list[Delivery]:
        if self.sent or not measures:
            time.sleep(timeout)
            return []
        self.sent = True
        record = Record(self.value, None, "measures/0@0", ("measures/0", 0))
        return [Delivery(MEASURES, [record], self.acked.set)]

    def caught_up(self) -> bool:
        return True

    def status(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


def test_a_silent_broker_never_holds_the_collectors_loop(silent_broker: int, tmp_path: Path) -> None:
    """While the RabbitMQ input tries (and retries) a broker that never answers, with pika's
    default timeouts, the collector's loop goes on: another input's measures are applied and
    acknowledged, and the tick runs, within a second or two; stopping the loop is prompt too.
    The input says it is not connected, and no round waits on the broker."""
    store = Store(f"sqlite:///{tmp_path}/usage.db")
    store.migrate()
    rabbit = RabbitInput(RabbitConfig(f"amqp://guest:guest@127.0.0.1:{silent_broker}/%2F"))
    measures = OneBatch()
    collector = Collector(store, Settings(), Clock(T0 + HOUR))
    feeder = Feeder(collector, [rabbit, measures], Metrics(), tick_seconds=0.2, poll_timeout=0.1)
    ticks: list[float] = []
    tick = collector.tick

    def counted(**kwargs: Any) -> Outcome:
        ticks.append(time.monotonic())
        return tick(**kwargs)

    collector.tick = counted  # type: ignore[method-assign]
    rounds: list[float] = []

    def loop() -> None:
        feeder.start()
        try:
            while not feeder.stop_event.is_set():
                began = time.monotonic()
                feeder.step()
                rounds.append(time.monotonic() - began)
        finally:
            feeder.close()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        wait_for(
            lambda: measures.acked.is_set() and len(ticks) >= 5, 3, "the measures applied and five ticks"
        )
        assert not rabbit.status()["rabbitmq"]["connected"]
        assert feeder.totals.batches == 1
        assert max(rounds) < 1.0, rounds
    finally:
        feeder.stop()
        stopped_at = time.monotonic()
        thread.join(5)
    assert not thread.is_alive(), "the loop is still held by the broker after the stop"
    assert time.monotonic() - stopped_at < 2.0, "stopping waited on the broker"
    store.close()


def test_kvmeter_collector_with_a_silent_broker_stops_at_once_on_sigterm(
    silent_broker: int, tmp_path: Path
) -> None:
    """The real `kvmeter collector` from a TOML whose [rabbitmq] url names a port that never
    answers (pika's default timeouts): it serves its API and stops within a second or two of a
    SIGTERM, not when pika's connect gives up (10-15 s, again at every retry)."""
    port = free_port()
    config = tmp_path / "collector.toml"
    config.write_text(
        f'[store]\nurl = "sqlite:///{tmp_path}/usage.db"\n'
        f'[rabbitmq]\nurl = "amqp://guest:guest@127.0.0.1:{silent_broker}/%2F"\n'
        f'[api]\nlisten = "127.0.0.1:{port}"\ntoken = "silent-broker-token-0123"\n'
    )
    log = tmp_path / "collector.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvmeter", "collector", "--config", str(config)],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for_port("127.0.0.1", port, 30, "the collector's API")
        time.sleep(0.5)  # its first connection attempt under way
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        try:
            code = proc.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, log.read_text()
        assert time.monotonic() - started < 4, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
