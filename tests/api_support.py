"""A store filled through the live code path, and the real API server over it on loopback."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

from kvmeter.collector.api import ApiServer
from kvmeter.collector.ingest import ingest_events, ingest_measures
from kvmeter.collector.model import Settings
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store
from tests.collector_support import HOUR, T0, Clock, delimited, scenario

NOW = T0 + 5 * HOUR


def filled_store(tmp_path: Path) -> tuple[Store, Collector]:
    """The shared scenario's events and measures ingested, windows ticked up to NOW."""
    store = Store(f"sqlite:///{tmp_path}/usage.db")
    store.migrate()
    collector = Collector(store, Settings(), Clock(NOW))
    sc = scenario()
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join(v for _, v in sc.events) + b"\n")
    measures = tmp_path / "m.pb"
    measures.write_bytes(delimited(sc.batches))
    ingest_events(collector, events)
    ingest_measures(collector, measures)
    collector.tick()
    return store, collector


@contextlib.contextmanager
def running(server: ApiServer) -> Iterator[str]:
    """The server on its own thread; yields its base URL."""
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield server.url
    finally:
        server.close()
        thread.join(10)
