"""A store filled through the live code path, and the real API server over it on loopback."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flask import Flask, g, request

from kvmeter.collector.api import ApiServer, create_app
from kvmeter.collector.api_auth import Principal
from kvmeter.collector.ingest import ingest_events, ingest_measures
from kvmeter.collector.model import Settings
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store
from tests.collector_support import HOUR, T0, Clock, delimited, scenario

NOW = T0 + 5 * HOUR
# A tariff for the scenario's usage types (the costs tests' figures are computed by hand from it)
TARIFF = {
    "currency": "EUR",
    "decimals": 6,
    "rate": [
        {"usage_type": "RUNNING_VM", "per_hour": "0.02"},
        {"usage_type": "ALLOCATED_VM", "per_hour": "0.001"},
        {"usage_type": "IP_ADDRESS", "per_hour": "0.005"},
        {"usage_type": "NETWORK_BYTES_SENT", "traffic_type": "public", "unit": "kB", "price": "1"},
        {"usage_type": "NETWORK_BYTES_RECEIVED", "traffic_type": "public", "unit": "kB", "price": "0"},
    ],
}


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


def scoped_app(store: Store, **kwargs: Any) -> Flask:
    """The API with a caller set per request by test headers (X-Test-Accounts, X-Test-Domains:
    comma-separated), as a credential would set it; without them, the operator."""
    app = create_app(store, **kwargs)

    @app.before_request
    def _principal() -> None:
        accounts = request.headers.get("X-Test-Accounts")
        if accounts is not None:
            domains = request.headers.get("X-Test-Domains", "")
            g.principal = Principal(
                "tenant",
                frozenset(a for a in accounts.split(",") if a),
                frozenset(d for d in domains.split(",") if d),
            )

    return app
