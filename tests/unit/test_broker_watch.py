"""BrokerWatch: reachability from librdkafka's statistics, errors and messages, and since when."""

from __future__ import annotations

import json

from kvmeter.collector.broker_watch import BrokerWatch


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def stats(*states: str) -> str:
    return json.dumps({"brokers": {f"b{i}": {"state": s, "nodeid": i} for i, s in enumerate(states)}})


def test_unreachable_from_the_start_until_a_broker_is_up() -> None:
    clock = Clock()
    watch = BrokerWatch(60, clock)
    clock.now += 59
    watch.on_stats("measures", stats("INIT", "TRY_CONNECT"))
    assert watch.degraded() == ""
    clock.now += 2
    assert watch.degraded().startswith("no Kafka broker reachable for 61 s (limit 60 s)")
    watch.on_stats("measures", stats("INIT", "UP"))
    assert watch.degraded() == ""
    assert watch.status() == {"reachable": True, "unreachable_seconds": None, "last_error": ""}


def test_an_outage_counts_from_when_the_last_client_lost_the_brokers() -> None:
    clock = Clock()
    watch = BrokerWatch(30, clock)
    watch.seen("measures", reachable=True)
    watch.seen("lifecycle", reachable=True)
    clock.now += 100
    watch.on_error("measures", "_ALL_BROKERS_DOWN", "1/1 brokers are down")
    assert watch.status()["reachable"]  # the lifecycle client still reaches one
    clock.now += 10
    watch.on_stats("lifecycle", stats("DOWN"))
    clock.now += 29
    assert watch.degraded() == ""
    assert watch.status()["unreachable_seconds"] == 29
    clock.now += 1
    assert "last error _ALL_BROKERS_DOWN: 1/1 brokers are down" in watch.degraded()
    watch.seen("measures", reachable=True)  # a message came in
    assert watch.degraded() == ""


def test_other_errors_and_bad_statistics_change_nothing() -> None:
    clock = Clock()
    watch = BrokerWatch(5, clock)
    watch.seen("measures", reachable=True)
    watch.on_error("measures", "_TRANSPORT", "Connect to ipv4#10.0.0.1:9092 failed")
    watch.on_stats("measures", "not json")
    watch.on_stats("measures", "[]")
    clock.now += 100
    assert watch.degraded() == ""
    assert watch.status()["last_error"] == "_TRANSPORT: Connect to ipv4#10.0.0.1:9092 failed"
