"""The shipped dashboards and alert rules (packaging/monitoring/) as the tests read them: the
metric names a PromQL expression selects, and the series names a daemon exposes, from its
registry or from a scrape of its /metrics."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

TOP = Path(__file__).resolve().parents[1]
MONITORING = TOP / "packaging/monitoring"
RULE_TESTS = TOP / "tests/monitoring"
DAEMONS = ("agent", "collector")
# Series Prometheus makes itself for every target, not a daemon's.
SCRAPE_SERIES = {"up"}


def rules_file(daemon: str) -> Path:
    return MONITORING / f"prometheus/kvmeter-{daemon}.rules.yml"


def dashboard_file(daemon: str) -> Path:
    return MONITORING / f"grafana/kvmeter-{daemon}.json"


# --- PromQL: the metric names an expression selects -------------------------------------------

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
            "offset", "inf", "nan"}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """Every metric an expression selects: identifiers left once strings, label matchers, ranges
    and grouping label lists are taken out, that are neither functions (followed by `(`),
    keywords, number or duration parts, nor Grafana variables."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        before = text[m.start() - 1] if m.start() else " "
        if before.isdigit() or before in ".$":
            continue
        if text[m.end() :].lstrip().startswith("(") or m.group().lower() in KEYWORDS:
            continue
        names.add(m.group())
    return names


# --- the rules and dashboards -----------------------------------------------------------------


def alert_rules(daemon: str) -> list[dict[str, Any]]:
    doc = yaml.safe_load(rules_file(daemon).read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard(daemon: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(dashboard_file(daemon).read_text())
    return loaded


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in board["panels"] if p["type"] != "row"]


def dashboard_queries(board: dict[str, Any]) -> list[str]:
    """Every PromQL query: the panels' targets and the template variables' label_values()."""
    queries = [t["expr"] for p in panels(board) for t in p["targets"]]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.+),\s*\w+\)", var["query"]["query"])
            assert m, var
            queries.append(m.group(1))
    return queries


def rule_metrics(daemon: str) -> set[str]:
    return set().union(*(metric_names(rule["expr"]) for rule in alert_rules(daemon))) - SCRAPE_SERIES


def dashboard_metrics(daemon: str) -> set[str]:
    return set().union(*(metric_names(q) for q in dashboard_queries(dashboard(daemon))))


# --- what a daemon exposes --------------------------------------------------------------------

SUFFIXES = {  # the series a family of each type is exposed as (text format)
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "unknown": ("",),
}


def series_names(families: Iterable[Any]) -> set[str]:
    """Series names of metric families: their samples, and for a labelled family with no child
    yet (HELP and TYPE only) the names its type gives it."""
    names: set[str] = set()
    for family in families:
        names.update(sample.name for sample in family.samples)
        names.update(family.name + suffix for suffix in SUFFIXES[family.type])
    return names


def registry_names(registry: Any) -> set[str]:
    return series_names(registry.collect())


def scraped_names(exposition: str) -> set[str]:
    """From a /metrics body, read with prometheus_client's own parser."""
    return series_names(text_string_to_metric_families(exposition))
