"""The API counts its responses by route and status (kvmeter_api_responses_total), the series
the collector's API-errors alert and dashboard read: errors from handlers included."""

from __future__ import annotations

from pathlib import Path

from kvmeter.collector.api import create_app
from kvmeter.collector.metrics import Metrics
from kvmeter.collector.store import Store


def count(metrics: Metrics, route: str, code: str) -> float:
    value = metrics.registry.get_sample_value("kvmeter_api_responses_total", {"route": route, "code": code})
    return value or 0.0


def test_responses_counted_by_route_and_status_5xx_included(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path}/usage.db")
    store.migrate()
    metrics = Metrics()
    app = create_app(store, metrics=metrics)

    @app.get("/v1/broken")
    def broken() -> str:
        raise RuntimeError("a bug in a handler")

    client = app.test_client()
    try:
        assert client.get("/health").status_code == 200
        assert client.get("/health").status_code == 200
        assert client.get("/v1/usage", query_string={"start": "yesterday"}).status_code == 400
        assert client.get("/no/such/path").status_code == 404
        assert client.get("/v1/broken").status_code == 500
        assert client.get("/metrics").status_code == 200
    finally:
        store.close()
    assert count(metrics, "/health", "200") == 2
    assert count(metrics, "/v1/usage", "400") == 1
    assert count(metrics, "unmatched", "404") == 1
    assert count(metrics, "/v1/broken", "500") == 1
    assert count(metrics, "/metrics", "200") == 1
