"""The collector's loop over its inputs (feed.Feeder) with a real store: a delivery is acknowledged
only after its transaction committed, a failing store is retried without acknowledging, measures
wait until every input has read its lifecycle backlog, and every input's status shows on /health."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Connection

from kvmeter.collector.feed import Feeder, drain
from kvmeter.collector.inputs import LIFECYCLE, MEASURES, Delivery
from kvmeter.collector.metrics import Metrics
from kvmeter.collector.model import Outcome, Record, Settings
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store
from tests.collector_support import HOUR, T0, Clock, expected_usage, net_by_short_key, scenario

NOW = T0 + 5 * HOUR


class ListInput:
    """An input over lists of records; records the order of what the loop did with it."""

    def __init__(
        self, name: str, lifecycle: list[list[Record]], measures: list[list[Record]], log: list[str]
    ):
        self.name, self.lifecycle, self.measures, self.log = name, lifecycle, measures, log
        self.asked_for_measures: list[bool] = []

    def start(self) -> None:
        self.log.append(f"{self.name} start")

    def poll(self, timeout: float, *, measures: bool = True) -> list[Delivery]:
        self.asked_for_measures.append(measures)
        out = []
        if self.lifecycle:
            out.append(self._delivery(LIFECYCLE, self.lifecycle.pop(0)))
        if measures and self.measures:
            out.append(self._delivery(MEASURES, self.measures.pop(0)))
        return out

    def _delivery(self, kind: str, records: list[Record]) -> Delivery:
        return Delivery(kind, records, lambda: self.log.append(f"{self.name} ack {kind} {len(records)}"))

    def caught_up(self) -> bool:
        return not self.lifecycle

    def status(self) -> dict[str, Any]:
        return {f"{self.name}_pending": len(self.lifecycle) + len(self.measures)}

    def close(self) -> None:
        self.log.append(f"{self.name} close")


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(f"sqlite:///{tmp_path}/usage.db")
    s.migrate()
    yield s  # type: ignore[misc]
    s.close()


def records(values: list[bytes], prefix: str) -> list[Record]:
    return [Record(v, None, f"{prefix}#{i}") for i, v in enumerate(values)]


def test_two_inputs_feed_one_collector_lifecycle_first(store: Store) -> None:
    sc = scenario()
    log: list[str] = []
    events = records([v for _, v in sc.events], "events")
    one = ListInput("one", [events[:3], events[3:]], [records(sc.batches[:2], "m")], log)
    two = ListInput("two", [], [records(sc.batches[2:], "m2")], log)
    collector = Collector(store, Settings(), Clock(NOW))
    feeder = Feeder(collector, [one, two], Metrics(), tick_seconds=3600, poll_timeout=0)
    applied: list[str] = []
    real_events, real_batches = collector.apply_events, collector.apply_batches

    def apply_events(recs: list[Record], within: Callable[[Connection], None] | None = None) -> Outcome:
        applied.append(f"apply {LIFECYCLE} {len(recs)}")
        log.append(applied[-1])
        return real_events(recs, within=within)

    def apply_batches(recs: list[Record]) -> Outcome:
        applied.append(f"apply {MEASURES} {len(recs)}")
        log.append(applied[-1])
        return real_batches(recs)

    collector.apply_events = apply_events  # type: ignore[method-assign]
    collector.apply_batches = apply_batches  # type: ignore[method-assign]
    feeder.start()
    feeder.catch_up(timeout_s=10)
    assert one.asked_for_measures == [False, False]
    assert two.asked_for_measures == [False, False]
    feeder.step()
    feeder.step()
    feeder.close()
    n = len(events)
    assert log == [
        "one start",
        "two start",
        "apply lifecycle 3",
        "one ack lifecycle 3",
        f"apply lifecycle {n - 3}",
        f"one ack lifecycle {n - 3}",
        "apply measures 2",
        "one ack measures 2",
        f"apply measures {len(sc.batches) - 2}",
        f"two ack measures {len(sc.batches) - 2}",
        "one close",
        "two close",
    ]
    collector.tick()
    assert net_by_short_key(store.net_usage()) == expected_usage(NOW)
    assert feeder.status()["one_pending"] == 0
    assert feeder.status()["failing"] == ""


def test_a_failing_store_is_retried_and_nothing_is_acknowledged_before_the_commit(store: Store) -> None:
    sc = scenario()
    log: list[str] = []
    source = ListInput("in", [records([v for _, v in sc.events], "e")], [], log)
    collector = Collector(store, Settings(), Clock(NOW))
    feeder = Feeder(collector, [source], Metrics(), tick_seconds=3600, poll_timeout=0)
    real = collector.apply_events
    failures = [RuntimeError("database down"), RuntimeError("still down")]

    def flaky(recs: list[Record], within: Callable[[Connection], None] | None = None) -> Outcome:
        log.append(f"try, acked so far: {sum(line.startswith('in ack') for line in log)}")
        if failures:
            raise failures.pop(0)
        return real(recs, within=within)

    collector.apply_events = flaky  # type: ignore[method-assign]
    feeder.step()
    assert log == ["try, acked so far: 0"] * 3 + [f"in ack lifecycle {len(sc.events)}"]
    assert feeder.metrics.errors.labels(LIFECYCLE)._value.get() == 2
    assert feeder.totals.events == len(sc.events)


def test_drain_applies_a_whole_input_and_returns_what_happened(store: Store, tmp_path: Path) -> None:
    sc = scenario()
    log: list[str] = []
    source = ListInput("in", [records([v for _, v in sc.events], "e"), records([b"{"], "bad")], [], log)
    out = drain(Collector(store, Settings(), Clock(NOW)), source)
    assert out.events == len(sc.events)
    assert [(d.reason, d.raw) for d in out.dead_letters] == [("malformed_json", b"{")]
    assert log[0] == "in start"
    assert log[-1] == "in close"
