"""The HTTP API over real HTTP on loopback (waitress), against a store filled by ingest."""

from __future__ import annotations

import base64
import csv
import hashlib
import hmac
import io
import json
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmeter.collector.api import serve
from kvmeter.collector.ingest import ingest_events, ingest_measures
from kvmeter.collector.metrics import Metrics
from kvmeter.collector.model import Record, Settings
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store
from tests.collector_support import (
    ACCT_A,
    ACCT_B,
    HOUR,
    T0,
    VM1,
    VM2,
    Clock,
    delimited,
    expected_usage,
    scenario,
    usage_event,
)

NOW = T0 + 5 * HOUR
TOKEN = "s3cret-token-0123456"


class Api:
    def __init__(self, base: str, metrics: Metrics, collector: Collector):
        self.base = base
        self.metrics = metrics
        self.collector = collector

    def get(self, path: str, token: str | None = TOKEN, **params: str) -> tuple[int, str, str]:
        url = self.base + path + ("?" + urllib.parse.urlencode(params) if params else "")
        req = urllib.request.Request(url)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
        except urllib.error.HTTPError as err:
            body = err.read().decode()
            err.close()
            return err.code, err.headers.get("Content-Type", ""), body


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    store = Store(f"sqlite:///{tmp_path}/usage.db")
    store.migrate()
    collector = Collector(store, Settings(), Clock(NOW))
    sc = scenario()
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join(v for _, v in sc.events) + b"\n")
    measures = tmp_path / "m.pb"
    measures.write_bytes(delimited(sc.batches))
    metrics = Metrics()
    metrics.watch_store(store, collector.horizon_start)
    metrics.record(ingest_events(collector, events))
    metrics.record(ingest_measures(collector, measures))
    metrics.record(collector.apply_batches([Record(b"\x08garbage", None, "test")]))
    metrics.record(collector.tick())
    server = serve(store, "127.0.0.1", 0, token=TOKEN, metrics=metrics)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield Api(f"http://127.0.0.1:{server.port}", metrics, collector)
    finally:
        server.close()
        thread.join(10)
        store.close()


def test_health_is_open_everything_else_needs_the_token(api: Api) -> None:
    status, _, body = api.get("/health", token=None)
    assert status == 200
    assert json.loads(body)["status"] == "ok"
    assert api.get("/v1/usage", token=None, start="2024-05-14", end="2024-05-15")[0] == 401
    assert api.get("/v1/usage", token="wrong", start="2024-05-14", end="2024-05-15")[0] == 401
    assert api.get("/metrics", token=None)[0] == 401


def test_usage_json_and_csv_with_filters(api: Api) -> None:
    status, ctype, body = api.get("/v1/usage", start="2024-05-14", end="2024-05-15")
    assert status == 200
    assert ctype.startswith("application/json")
    doc = json.loads(body)
    got = {(r["account"], r["usage_type"], r["resource"], r["traffic_type"], r["start_ms"]): r["quantity"]
           for r in doc["usage"]}  # fmt: skip
    assert got == expected_usage(NOW)
    assert doc["count"] == len(expected_usage(NOW))
    _, _, body = api.get("/v1/usage", start=str(T0), end=str(NOW), account=ACCT_B, type="1")
    assert [r["start_ms"] for r in json.loads(body)["usage"]] == list(range(T0, NOW, HOUR))
    status, ctype, body = api.get(
        "/v1/usage", start="2024-05-14", end="2024-05-15", resource=VM2, format="csv"
    )
    assert status == 200
    assert ctype.startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(body)))
    assert {r["resource"] for r in rows} == {VM2}
    assert len(rows) == 11


def test_bad_usage_queries_are_400_with_a_reason(api: Api) -> None:
    status, _, body = api.get("/v1/usage", end="2024-05-15")
    assert status == 400
    assert "start is required" in json.loads(body)["error"]
    assert api.get("/v1/usage", start="2024-05-15", end="2024-05-14")[0] == 400
    assert api.get("/v1/usage", start="2024-05-14", end="2024-05-15", type="bytes")[0] == 400
    assert api.get("/v1/usage", start="2024-05-14", end="2024-05-15", format="xml")[0] == 400


def test_cloudstack_list_usage_records(api: Api) -> None:
    status, _, body = api.get(
        "/client/api", command="listUsageRecords", startdate="2024-05-14", enddate="2024-05-14",
        accountid=ACCT_A, type="4", response="json",
    )  # fmt: skip
    assert status == 200
    response = json.loads(body)["listusagerecordsresponse"]
    assert response["count"] == 2
    records = sorted(response["usagerecord"], key=lambda r: r["startdate"])
    assert [(r["rawusage"], r["startdate"], r["enddate"]) for r in records] == [
        ("1000", "2024-05-14T09:00:00+0000", "2024-05-14T09:59:59+0000"),
        ("200", "2024-05-14T10:00:00+0000", "2024-05-14T10:59:59+0000"),
    ]
    assert {r["usagetype"] for r in records} == {4}
    assert {r["type"] for r in records} == {"UserVm"}
    # With times, the range is exact: only the 11:00 hour.
    _, _, body = api.get(
        "/client/api",
        command="listUsageRecords",
        startdate="2024-05-14 11:00:00",
        enddate="2024-05-14 11:59:59",
        response="json",
    )
    starts = {r["startdate"] for r in json.loads(body)["listusagerecordsresponse"]["usagerecord"]}
    assert starts == {"2024-05-14T11:00:00+0000"}


def test_cloudstack_errors(api: Api) -> None:
    status, _, body = api.get(
        "/client/api", command="listUsageRecords", enddate="2024-05-14", response="json"
    )
    assert status == 431
    assert "startdate" in json.loads(body)["listusagerecordsresponse"]["errortext"]
    status, _, body = api.get("/client/api", command="deployVirtualMachine")
    assert status == 432
    assert api.get("/client/api", command="listUsageRecords", startdate="2024-05-14", enddate="2024-05-14",
                   usageid=VM2)[0] == 431  # fmt: skip


def test_metrics_report_store_truth_and_counters(api: Api) -> None:
    status, ctype, body = api.get("/metrics")
    assert status == 200
    assert ctype.startswith("text/plain")
    values = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values["kvmeter_store_parked_bytes"] == scenario().parked_bytes
    assert values["kvmeter_store_quarantined_bytes"] == scenario().quarantined_bytes
    assert values["kvmeter_store_dead_letters"] == 1
    assert values['kvmeter_dead_letters_total{reason="malformed_protobuf",source="measures"}'] == 1
    assert values["kvmeter_batches_applied_total"] == len(scenario().batches)
    # Parked longer than the horizon (24 h): reported as unattributed, still parked.
    assert values["kvmeter_store_unattributed_bytes"] == 0
    api.collector.clock.now = NOW + 25 * HOUR  # type: ignore[attr-defined]
    values2 = dict(line.rsplit(" ", 1) for line in api.get("/metrics")[2].splitlines() if line[:1] != "#")
    assert float(values2["kvmeter_store_unattributed_bytes"]) == scenario().parked_bytes
    assert float(values2["kvmeter_store_parked_bytes"]) == scenario().parked_bytes


def test_cloudstack_paging_keeps_the_total_count(api: Api) -> None:
    query = {
        "command": "listUsageRecords",
        "startdate": "2024-05-14",
        "enddate": "2024-05-14",
        "response": "json",
    }
    whole = json.loads(api.get("/client/api", **query)[2])["listusagerecordsresponse"]
    pages = []
    for page in (1, 2, 3, 4, 5):
        body = json.loads(api.get("/client/api", **query, page=str(page), pagesize="7")[2])
        assert body["listusagerecordsresponse"]["count"] == whole["count"]
        pages += body["listusagerecordsresponse"].get("usagerecord", [])  # past the end: count alone
    assert whole["count"] > 21
    assert pages == whole["usagerecord"][:35]
    # CloudStack (BaseListCmd) reads a page below 1 as the first; page needs pagesize.
    first = json.loads(api.get("/client/api", **query, page="0", pagesize="7")[2])["listusagerecordsresponse"]
    assert first["usagerecord"] == whole["usagerecord"][:7]
    assert api.get("/client/api", **query, page="2")[0] == 431


API_KEY, SECRET = "kvm-api-key", "kvm-secret-key"


def cloudmonkey_sign(params: dict[str, str], secret: str) -> dict[str, str]:
    """A client's signing, as CloudStack's developer guide spells it (written here apart from
    the server's code): URL-encode values with spaces as %20, sort by field, lower-case the
    whole string, HMAC-SHA1 with the secret key, base64."""
    query = "&".join(
        f"{k}={urllib.parse.quote(v, safe='')}" for k, v in sorted(params.items(), key=lambda i: i[0].lower())
    )
    digest = hmac.new(secret.encode(), query.lower().encode(), hashlib.sha1).digest()
    return {**params, "signature": base64.b64encode(digest).decode()}


@pytest.fixture
def signed_api(tmp_path: Path) -> Iterator[Api]:
    store = Store(f"sqlite:///{tmp_path}/usage.db")
    store.migrate()
    collector = Collector(store, Settings(), Clock(NOW))
    sc = scenario()
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join(v for _, v in sc.events) + b"\n")
    ingest_events(collector, events)
    server = serve(store, "127.0.0.1", 0, token=TOKEN, cloudstack_keys={API_KEY: SECRET})
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield Api(f"http://127.0.0.1:{server.port}", Metrics(), collector)
    finally:
        server.close()
        thread.join(10)
        store.close()


def test_cloudstack_clients_authenticate_with_a_signed_request(signed_api: Api) -> None:
    params = {
        "command": "listUsageRecords",
        "startDate": "2024-05-14 09:00:00",
        "endDate": "2024-05-14 09:59:59",
        "type": "2",
        "response": "json",
        "apiKey": API_KEY,
    }
    status, _, body = signed_api.get("/client/api", token=None, **cloudmonkey_sign(params, SECRET))
    assert status == 200, body
    records = json.loads(body)["listusagerecordsresponse"]["usagerecord"]
    assert {(r["usageid"], r["rawusage"]) for r in records} == {(VM1, "1"), (VM2, "1")}
    assert signed_api.get("/client/api", token=None, **cloudmonkey_sign(params, "wrong"))[0] == 401
    tampered = {**cloudmonkey_sign(params, SECRET), "type": "1"}
    assert signed_api.get("/client/api", token=None, **tampered)[0] == 401
    expired = {**params, "signatureVersion": "3", "expires": "2020-01-01T00:00:00+0000"}
    status, _, body = signed_api.get("/client/api", token=None, **cloudmonkey_sign(expired, SECRET))
    assert status == 401  # signed right, but expired: CloudStack's one refusal (why: in the log)
    assert "unable to verify user credentials and/or request signature" in body
    future = {**params, "signatureVersion": "3", "expires": "2099-01-01T00:00:00+0000"}
    assert signed_api.get("/client/api", token=None, **cloudmonkey_sign(future, SECRET))[0] == 200
    assert signed_api.get("/client/api", **params)[0] == 200  # the bearer token still works
    assert signed_api.get("/v1/usage", token=None, start="2024-05-14", end="2024-05-15")[0] == 401


def test_health_reports_the_consumer_and_fails_while_it_does(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path}/usage.db")
    store.migrate()
    state = {"measures_partitions": [0], "failing": ""}
    server = serve(store, "127.0.0.1", 0, status=lambda: dict(state))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        api = Api(f"http://127.0.0.1:{server.port}", Metrics(), Collector(store, Settings(), Clock(NOW)))
        status, _, body = api.get("/health", token=None)
        assert status == 200
        assert json.loads(body)["consumer"]["measures_partitions"] == [0]
        state["failing"] = "measures: OperationalError"
        status, _, body = api.get("/health", token=None)
        assert status == 503
        assert json.loads(body)["status"] == "failing"
    finally:
        server.close()
        thread.join(10)
        store.close()


def test_adjustments_since_a_time(api: Api) -> None:
    collector = api.collector
    collector.clock.now = NOW + HOUR  # type: ignore[attr-defined]
    key, value = usage_event("VM.STOP", VM2, ACCT_B, T0 + 90 * 60_000)
    collector.apply_event(value, key)
    status, _, body = api.get("/v1/adjustments", since=str(NOW + HOUR))
    assert status == 200
    rows = json.loads(body)["adjustments"]
    assert {(r["resource"], r["usage_type"], r["reason"]) for r in rows} == {(VM2, 1, "late lifecycle")}
    assert sum(r["delta"] for r in rows) == -(30 * 60_000 + HOUR)  # final: 10-11 (-30 min), 11-12 (-1 h)
    assert json.loads(api.get("/v1/adjustments", since=str(NOW + HOUR + 1))[2])["count"] == 0
    status, ctype, body = api.get("/v1/adjustments", since="2024-05-14", format="csv", account=ACCT_B)
    assert ctype.startswith("text/csv")
    assert len(list(csv.DictReader(io.StringIO(body)))) == len(rows)
    assert api.get("/v1/adjustments")[0] == 400
