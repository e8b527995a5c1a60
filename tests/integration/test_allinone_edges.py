"""The all-in-one at its edges: the measure batches its agent hands over counted on /metrics,
/health failing while the store refuses them, and a SIGHUP whose broken tariff file keeps only the
tariff from reloading (a revoked token stops working all the same)."""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy.exc import OperationalError

import kvmeter.agent.cli
from kvmeter.pipeline import allinone
from tests.collector_support import ACCT_A, HOUR, MIN, T0, VM1, Clock, M, Stream, usage_event
from tests.harness.ports import free_port, wait_for_port

# The shipped example tariff.
TARIFF = Path(__file__).resolve().parents[2] / "packaging" / "config" / "tariff.toml.example"


def _sample(registry: CollectorRegistry, name: str, labels: dict[str, str] | None = None) -> float:
    value = registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


def _all_in_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, api: str = "enabled = false", extra: str = ""
) -> tuple[Any, Any]:
    """An all-in-one from TOML (its agent stubbed) and the in-process producer it gives the agent."""
    factories: list[Any] = []

    def build_agent(_cfg: Any, *, read_only: bool, producer_factory: Any) -> Any:
        factories.append(producer_factory)
        return SimpleNamespace(set_traffic_rules=lambda _rules: None)

    monkeypatch.setattr(kvmeter.agent.cli, "build_agent", build_agent)
    events = tmp_path / "events.jsonl"
    events.write_bytes(
        b"".join(
            usage_event(e, VM1, ACCT_A, T0 + at)[1] + b"\n" for e, at in (("VM.CREATE", 0), ("VM.START", 0))
        )
    )
    config = tmp_path / "allinone.toml"
    config.write_text(
        f'[store]\nurl = "sqlite:///{tmp_path}/usage.db"\n[api]\n{api}\n'
        f'[agent]\nstate_dir = "{tmp_path}/agent"\n[lifecycle]\nevents_file = "events.jsonl"\n' + extra
    )
    pipeline = allinone.AllInOne(allinone.load(config), clock=Clock(T0 + HOUR // 2))
    return pipeline, factories[0](None)


def test_all_in_one_counts_the_measures_it_applies_on_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The all-in-one's measure batches come through the in-process hand-off, not the feeder: what
    they did (batches, measures, billed bytes, parked, dead letters) must reach /metrics as in the
    split collector, or kvmeter_billed_bytes_total and the dashboards' traffic panels stay at 0
    and the quarantine alert never fires."""
    pipeline, producer = _all_in_one(tmp_path, monkeypatch)
    try:
        pipeline.idle()  # the events file: VM1 is running from T0
        stream = Stream("stream-aio", "aio")
        producer.produce("measures", stream.batch([M(T0, T0 + MIN, 1500)]))
        producer.produce("measures", stream.batch([M(T0 + MIN, T0 + 2 * MIN, 700, quarantined=True)]))
        producer.produce("measures", b"not a batch")
        producer.poll(0)
        r = pipeline.metrics.registry
        assert pipeline.store.stats(0)["quarantined_bytes"] == 700  # applied, in the store
        assert _sample(r, "kvmeter_batches_applied_total") == 2
        assert _sample(r, "kvmeter_measures_total") == 2
        assert _sample(r, "kvmeter_billed_bytes_total") == 1500
        assert _sample(r, "kvmeter_measures_quarantined_total") == 1
        assert (
            _sample(r, "kvmeter_dead_letters_total", {"source": "measures", "reason": "malformed_protobuf"})
            == 1
        )
    finally:
        pipeline.close()


def _health(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_all_in_one_health_says_failing_while_the_store_refuses_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: `/health` answers 503 (`failing`) while a store write is being retried. The
    all-in-one serves the collector's API, so its /health must say so too while the batches
    its agent hands over cannot be applied (they wait in the spool), and ok again once they are."""
    port = free_port()
    pipeline, producer = _all_in_one(
        tmp_path, monkeypatch, f'listen = "127.0.0.1:{port}"', "[usage]\ntick_seconds = 3600\n"
    )
    try:
        url = pipeline.start_api()
        assert url is not None
        wait_for_port("127.0.0.1", port, 10, "the all-in-one's API")
        pipeline.idle()
        assert _health(url)[0] == 200

        def refused(*_args: Any, **_kwargs: Any) -> Any:
            raise OperationalError("INSERT", {}, Exception("database or disk is full"))

        stream = Stream("stream-aio", "aio")
        batch = stream.batch([M(T0, T0 + MIN, 1500)])
        with monkeypatch.context() as m:
            m.setattr(pipeline.collector, "apply_batch", refused)
            producer.produce("measures", batch)
            producer.poll(0)
            code, body = _health(url)
            assert (code, body["status"]) == (503, "failing"), body
            assert "OperationalError" in body["reason"]
        producer.produce("measures", batch)  # the publisher re-sends it from the spool
        producer.poll(0)
        code, body = _health(url)
        assert (code, body["status"]) == (200, "ok"), body
        assert _sample(pipeline.metrics.registry, "kvmeter_errors_total", {"stage": "measures"}) == 1
    finally:
        pipeline.close()


def _status(url: str, token: str) -> int:
    request = urllib.request.Request(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_all_in_one_sighup_removes_a_token_though_the_tariff_file_is_broken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README (Reload on SIGHUP): each part is reloaded on its own, a broken file keeps only its
    own part in force, and a credential removed stops working at once. `kvmeter collector` does
    so; the all-in-one must too: a tariff file caught mid-edit must not keep a revoked API token
    working (nor keep the router owners, the policy or the traffic rules from reloading)."""
    port, old, new = free_port(), "old-token-" + "a" * 22, "new-token-" + "b" * 22
    shutil.copy(TARIFF, tmp_path / "tariff.toml")
    pipeline, _ = _all_in_one(
        tmp_path,
        monkeypatch,
        f'listen = "127.0.0.1:{port}"\ntoken = "{old}"',
        '[billing]\ntariff_file = "tariff.toml"\n',
    )
    config = tmp_path / "allinone.toml"
    try:
        url = pipeline.start_api()
        assert url is not None
        wait_for_port("127.0.0.1", port, 10, "the all-in-one's API")
        assert _status(url, old) == 200
        config.write_text(config.read_text().replace(old, new))  # the leaked token revoked
        (tmp_path / "tariff.toml").write_text("currency = \n")  # and the tariff being edited
        reloads = allinone.reloads(str(config), pipeline)
        reloads.request()  # SIGHUP
        failed = reloads.run_pending()
        assert failed == ["tariff"]
        deadline = time.monotonic() + 5  # credentials reload on a thread of their own
        while _status(url, new) != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (_status(url, old), _status(url, new)) == (401, 200)
    finally:
        pipeline.close()
