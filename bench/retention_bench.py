"""Retention: does a prune pass stall ingestion? The same chunks of measure batches are applied
with no pass running (the baseline) and while a pass deletes a store's old month (closed VMs'
lifecycle events and quarantined measures), on SQLite and PostgreSQL; the chunk latencies side
by side, and the rows the pass deleted per second."""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from tests.collector_support import ACCT_A, HOUR, MIN, T0, Clock, M, Stream, usage_event

from kvmeter.collector.model import Measure, Record, Settings
from kvmeter.collector.prune import Pruner
from kvmeter.collector.retention import DAY_MS, RetentionPolicy
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store

LIVE_VM = "9b1f0000-0000-4000-8000-0000000live0"
POLICY = RetentionPolicy(lifecycle_events_ms=7 * DAY_MS, quarantined_measures_ms=7 * DAY_MS, batch_rows=5000)
NOW = T0 + 30 * 24 * HOUR


def _fill(store: Store, collector: Collector, vms: int, quarantined: int) -> None:
    """A month ago: `vms` VMs created and destroyed (2 events each), `quarantined` measures."""
    for start in range(0, vms, 500):
        events = [
            e
            for i in range(start, min(start + 500, vms))
            for e in (
                usage_event("VM.CREATE", f"9b1f0000-0000-4000-8000-{i:012d}", ACCT_A, T0),
                usage_event("VM.DESTROY", f"9b1f0000-0000-4000-8000-{i:012d}", ACCT_A, T0 + HOUR),
            )
        ]
        collector.apply_events([Record(v, k) for k, v in events])
    for start in range(0, quarantined, 5000):
        measures = [
            Measure("bench-q", i, 0, "hq", T0, T0 + MIN, "sent", 10**15, 1, "public", LIVE_VM, "", "", "", "")
            for i in range(start, min(start + 5000, quarantined))
        ]
        with store.write() as conn:
            store.quarantine(conn, measures, T0)


def _chunks(stream: Stream, n: int, at: int) -> Iterator[list[Record]]:
    """n chunks of 10 batches of 50 measures of the live VM, a second apart (made as needed)."""
    for c in range(n):
        start = at + c * 1000
        batches = [
            stream.batch([M(start + i, start + i + 1, 100 + i, instance=LIVE_VM) for i in range(50)])
            for _ in range(10)
        ]
        yield [Record(b) for b in batches]


def _latencies(
    collector: Collector, chunks: Iterator[list[Record]], until: Callable[[], bool]
) -> list[float]:
    out: list[float] = []
    for chunk in chunks:
        t = time.perf_counter()
        collector.apply_batches(chunk)
        out.append((time.perf_counter() - t) * 1000)
        if until():
            break
    return out


def _summary(ms: list[float]) -> dict[str, float]:
    ordered = sorted(ms)
    return {
        "chunks": len(ms),
        "p50_ms": statistics.median(ordered),
        "p95_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))],
        "max_ms": ordered[-1],
    }


def one_store(url: str, *, vms: int, quarantined: int) -> dict[str, Any]:
    store = Store(url)
    store.migrate()
    clock = Clock(T0 + 3 * HOUR)
    collector = Collector(store, Settings(grace_ms=2 * HOUR), clock)
    _fill(store, collector, vms, quarantined)
    clock.now = NOW
    collector.apply_events(
        [Record(v, k) for k, v in [usage_event("VM.CREATE", LIVE_VM, ACCT_A, NOW - DAY_MS)]]
    )
    collector.tick()
    stream = Stream("bench-live", "hl")
    baseline = _latencies(collector, _chunks(stream, 40, NOW - 2 * HOUR), lambda: False)
    done: dict[str, Any] = {}

    def prune() -> None:
        t = time.perf_counter()
        done["counts"] = Pruner(store, POLICY, clock).run()
        done["seconds"] = time.perf_counter() - t

    thread = threading.Thread(target=prune)
    thread.start()
    during = _latencies(collector, _chunks(stream, 3000, NOW - HOUR), lambda: not thread.is_alive())
    thread.join()
    store.close()
    counts = done["counts"]
    if counts["lifecycle_events"] != 2 * vms or counts["quarantined_measures"] != quarantined:
        raise RuntimeError(f"the pass deleted {counts}, not the whole old month")
    rows = sum(counts.values())
    base, under = _summary(baseline), _summary(during)
    return {
        "baseline": base,
        "during_prune": under,
        "rows_pruned": rows,
        "prune_seconds": done["seconds"],
        "rows_per_s": rows / done["seconds"],
        "p95_ratio": under["p95_ms"] / base["p95_ms"],
        "max_ratio": under["max_ms"] / base["max_ms"],
    }


def run(pg_dsn: str | None, *, vms: int, quarantined: int, log: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "vms": vms,
        "quarantined": quarantined,
        "batch_rows": POLICY.batch_rows,
        "stores": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        stores = {"sqlite": f"sqlite:///{tmp}/retention.db"}
        if pg_dsn:
            stores["postgresql"] = pg_dsn
        for name, url in stores.items():
            log(f"retention: {name}, {vms} closed VMs and {quarantined} quarantined measures")
            out["stores"][name] = one_store(url, vms=vms, quarantined=quarantined)
    return out
