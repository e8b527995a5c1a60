"""The shipped Grafana dashboards and Prometheus alert rules (packaging/monitoring/).

promtool (Debian's `prometheus` package, `make deps`) checks the rule files and runs their unit
tests (tests/monitoring/*.test.yml: series in, alerts expected to fire and expected not to). A
mutation pass proves each alert has both kinds of expectation. Every metric a rule or a
dashboard names must be one its daemon exports: the names come from the daemons' own registries.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvmeter.agent.metrics import AgentMetrics
from kvmeter.collector import unpriced_gauges
from kvmeter.collector.balance_watch import BalanceGauges
from kvmeter.collector.billing import tariff_file
from kvmeter.collector.billing.tariff_file import TariffSource
from kvmeter.collector.metrics import Metrics
from kvmeter.collector.outbox_relay import HandoffMetrics
from kvmeter.collector.store import Store
from tests.monitoring_support import (
    DAEMONS,
    RULE_TESTS,
    TOP,
    alert_rules,
    dashboard,
    dashboard_metrics,
    dashboard_queries,
    metric_names,
    panels,
    registry_names,
    rule_metrics,
    rules_file,
)


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    assert exe, "promtool is missing: `make deps` installs Debian's prometheus package"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


# --- PromQL: the metric names an expression selects -------------------------------------------


def test_metric_names_reads_selectors_not_labels_functions_or_numbers() -> None:
    expr = (
        'sum by (instance, le) (rate(a_total{job="x", path=~"/v1/{id}"}[5m])) / on (instance) '
        "group_left (zone) b_info offset 1h > 1e3 and bool c unless histogram_quantile(0.99, d_bucket)"
        " or vector(0) * $__rate_interval"
    )
    assert metric_names(expr) == {"a_total", "b_info", "c", "d_bucket"}


# --- names the daemons export, from their registries -------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, set[str]]]:
    """Per daemon, what it exports: the agent's AgentMetrics, the collector's Metrics watching a
    real (empty, migrated) store, as the daemons build them."""
    store = Store(f"sqlite:///{tmp_path_factory.mktemp('store')}/usage.db")
    store.migrate()
    collector = Metrics()
    collector.watch_store(store, lambda: 0)
    collector.registry.register(BalanceGauges(store))  # with a [balances] section
    HandoffMetrics(collector.registry, store)  # with a [handoff] section
    tariff = tariff_file.load(TOP / "packaging/config/tariff.toml.example")
    unpriced_gauges.watch(TariffSource(tariff, Path("tariff.toml")), store, collector.registry)  # [billing]
    try:
        yield {
            "agent": registry_names(AgentMetrics(enabled=True).registry),
            "collector": registry_names(collector.registry),
        }
    finally:
        store.close()


def test_registries_give_the_names_scrapes_see(exported: dict[str, set[str]]) -> None:
    # Counters are exposed with _total, store gauges are computed from the store at scrape time.
    agent = {"kvmeter_agent_polls_total", "kvmeter_agent_spool_oldest_age_seconds",
             "kvmeter_agent_poll_duration_seconds_bucket", "process_resident_memory_bytes"}  # fmt: skip
    collector = {"kvmeter_consumer_lag", "kvmeter_dead_letters_total", "kvmeter_store_dead_letters",
                 "kvmeter_store_unattributed_bytes", "kvmeter_api_responses_total"}  # fmt: skip
    assert agent <= exported["agent"]
    assert collector <= exported["collector"]
    assert "kvmeter_agent_polls" not in exported["agent"]


# --- alert rules ------------------------------------------------------------------------------


def test_rule_files_pass_promtool_check(tmp_path: Path) -> None:
    proc = promtool("check", "rules", *(str(rules_file(d)) for d in DAEMONS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    broken = tmp_path / "broken.rules.yml"  # proves the check can fail
    broken.write_text(rules_file("agent").read_text().replace("== 0", "== 0)", 1))
    assert promtool("check", "rules", str(broken)).returncode != 0


@pytest.mark.parametrize("daemon", DAEMONS)
def test_rule_unit_tests_pass(daemon: str) -> None:
    proc = promtool("test", "rules", f"kvmeter-{daemon}.test.yml", cwd=RULE_TESTS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


@pytest.mark.parametrize("daemon", DAEMONS)
def test_every_alert_is_tested_firing_and_quiet(daemon: str, tmp_path: Path) -> None:
    """Each alert in turn made never to fire, then always to fire: the unit tests must fail both
    times, so each alert has an expectation that it fires and one that it stays quiet. Only the
    alert's own expectations can catch its mutant (the others look at other alerts), so each
    mutant is run against those alone, two at a time."""
    doc = yaml.safe_load(rules_file(daemon).read_text())
    test_doc = yaml.safe_load((RULE_TESTS / f"kvmeter-{daemon}.test.yml").read_text())
    names = [rule["alert"] for rule in alert_rules(daemon)]
    assert len(names) == len(set(names))

    def survives(name: str, replacement: str) -> bool:
        work = tmp_path / f"{name}-{len(replacement)}"
        work.mkdir()
        changed = json.loads(json.dumps(doc))
        for group in changed["groups"]:
            for rule in group["rules"]:
                if rule["alert"] == name:
                    rule["expr"] = replacement
                    rule.pop("for", None)
        (work / "mutant.rules.yml").write_text(yaml.safe_dump(changed))
        own = _expectations_of(test_doc, name)
        assert own["tests"], f"{name} has no unit test"
        own["rule_files"] = [str(work / "mutant.rules.yml")]
        (work / "mutant.test.yml").write_text(yaml.safe_dump(own))
        return promtool("test", "rules", str(work / "mutant.test.yml")).returncode == 0

    mutants = [(name, replacement, kind) for name in names for replacement, kind in MUTATIONS]
    with ThreadPoolExecutor(max_workers=2) as pool:
        survived = list(pool.map(lambda m: survives(m[0], m[1]), mutants))
    missed = [f"{name} {kind}" for (name, _r, kind), alive in zip(mutants, survived, strict=True) if alive]
    assert not missed, f"the unit tests still pass when: {missed}"


MUTATIONS = (("vector(1) == 2", "never fires"), ("vector(1)", "always fires"))


def _expectations_of(test_doc: dict[str, Any], name: str) -> dict[str, Any]:
    """The unit test file with only the expectations about alert `name` (each test group that
    has some, its series as they are)."""
    groups = []
    for group in test_doc["tests"]:
        checks = [c for c in group.get("alert_rule_test", []) if c["alertname"] == name]
        if checks:
            kept = {k: v for k, v in group.items() if k not in ("alert_rule_test", "promql_expr_test")}
            groups.append({**kept, "alert_rule_test": checks})
    return {**test_doc, "tests": groups}


@pytest.mark.parametrize("daemon", DAEMONS)
def test_rules_name_only_exported_metrics(daemon: str, exported: dict[str, set[str]]) -> None:
    for rule in alert_rules(daemon):
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["annotations"]["description"], rule["alert"]
    named = rule_metrics(daemon)
    unknown = named - exported[daemon]
    assert not unknown, f"kvmeter-{daemon} does not export {sorted(unknown)}"
    assert len(named) > 5


# --- dashboards -------------------------------------------------------------------------------


@pytest.mark.parametrize("daemon", DAEMONS)
def test_dashboard_is_importable(daemon: str) -> None:
    """What Grafana's import needs: a uid, a title, a schema version, a Prometheus data source
    chosen by a variable (works through the UI import and through provisioning alike), unique
    panel ids, and panels that fit the 24-column grid without overlapping."""
    board = dashboard(daemon)
    assert board["uid"] == f"kvmeter-{daemon}"
    assert board["title"]
    assert board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in board["panels"]:
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24, p["title"]
        area = {(pos["x"] + dx, pos["y"] + dy) for dx in range(pos["w"]) for dy in range(pos["h"])}
        assert not area & cells, f"{p['title']} overlaps another panel"
        cells |= area
    for p in panels(board):
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        assert p["description"], p["title"]
        assert all(t["datasource"] == p["datasource"] for t in p["targets"]), p["title"]


@pytest.mark.parametrize("daemon", DAEMONS)
def test_dashboard_queries_parse_in_prometheus(daemon: str, tmp_path: Path) -> None:
    """Each query, its Grafana variables filled in, as a recording rule through `promtool check
    rules`: Prometheus's own parser."""
    fill = {"$__rate_interval": "2m", "$job": f"kvmeter-{daemon}", "$instance": ".*"}
    rules = []
    for n, query in enumerate(dashboard_queries(dashboard(daemon))):
        for var, value in fill.items():
            query = query.replace(var, value)
        assert "$" not in query, query
        rules.append({"record": f"kvmeter_dashboard:query{n}", "expr": query})
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = promtool("check", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules)} rules found" in proc.stdout


@pytest.mark.parametrize("daemon", DAEMONS)
def test_dashboard_names_only_exported_metrics(daemon: str, exported: dict[str, set[str]]) -> None:
    named = dashboard_metrics(daemon)
    unknown = named - exported[daemon]
    assert not unknown, f"kvmeter-{daemon} does not export {sorted(unknown)}"
    assert len(named) > 10
