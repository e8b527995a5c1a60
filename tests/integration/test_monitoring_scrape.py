"""Every metric the shipped dashboards and alert rules name is served by a running daemon:
`kvmeter run --all-in-one` started from a TOML file (the agent's metrics port and the collector's
API /metrics), scraped over HTTP and read with prometheus_client's parser. The same names as the
registries give (tests/unit/test_monitoring.py), so neither list can drift from the daemons."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest

from kvmeter.agent.metrics import AgentMetrics
from kvmeter.collector.metrics import Metrics
from tests.harness.libvirt_node import CLOUDSTACK_HOST, write_node_xml
from tests.harness.ports import free_port, wait_for_port
from tests.harness.processes import KVMETER, Process
from tests.monitoring_support import dashboard_metrics, registry_names, rule_metrics, scraped_names

# The shipped example tariff: the unpriced-usage gauges exist where a tariff is configured.
TARIFF = Path(__file__).resolve().parents[2] / "packaging" / "config" / "tariff.toml.example"


class AllInOne(Process):
    def __init__(self, workdir: Path, config: Path):
        super().__init__("allinone", workdir)
        self.config = config

    def args(self) -> list[str]:
        return [*KVMETER, "run", "--all-in-one", "--config", str(self.config)]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        body: str = resp.read().decode()
        return body


@pytest.mark.libvirt
def test_running_daemons_serve_every_metric_the_dashboards_and_rules_name(tmp_path: Path) -> None:
    uri = write_node_xml(tmp_path / "node.xml", CLOUDSTACK_HOST)
    agent_port, api_port = free_port(), free_port()
    config = tmp_path / "allinone.toml"
    config.write_text(
        f"""
[agent]
host_id = "aio"
poll_interval = 1.0
state_dir = "{tmp_path / "agent"}"
[libvirt]
uri = "{uri}"
[metrics]
enabled = true
address = "127.0.0.1"
port = {agent_port}
[store]
url = "sqlite:///{tmp_path / "usage.db"}"
[usage]
tick_seconds = 1
[api]
listen = "127.0.0.1:{api_port}"
[billing]
tariff_file = "{TARIFF}"
[balances]
threshold = "1.00"
[handoff]
webhook_url = "http://127.0.0.1:{free_port()}/items"
"""
    )
    daemon = AllInOne(tmp_path, config)
    daemon.start()
    try:
        wait_for_port("127.0.0.1", api_port, 30, "kvmeter run --all-in-one")
        wait_for_port("127.0.0.1", agent_port, 30, "the agent's metrics")
        deadline = time.monotonic() + 30
        agent = scraped_names(scrape(agent_port))
        while "kvmeter_agent_polls_total" not in agent and time.monotonic() < deadline:
            time.sleep(0.5)
            agent = scraped_names(scrape(agent_port))
        collector = scraped_names(scrape(api_port))  # loopback, no credential yet: the operator
    finally:
        daemon.stop()
    served = {"agent": agent, "collector": collector}
    for name in ("agent", "collector"):
        named = rule_metrics(name) | dashboard_metrics(name)
        missing = named - served[name]
        assert not missing, f"the running {name} does not serve {sorted(missing)}\n{daemon.logs()}"
    # The registries the unit tests read are what the daemons serve (the collector's, plus the
    # gauges its parts register when they start: store, balances, hand-off, lifecycle memory).
    assert served["agent"] == registry_names(AgentMetrics(enabled=True).registry)
    assert registry_names(Metrics().registry) < served["collector"]
