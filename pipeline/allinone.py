"""`kvmeter run --all-in-one`: agent and collector in one process on one machine, SQLite, no Kafka.

One thread does all the writing, in this order, forever: the agent polls and spools (fsync) a
batch, the in-process hand-off applies it in one collector transaction and only then lets the
agent acknowledge it in the spool; between polls the same thread runs one round of the
collector's loop (feed.Feeder): new CloudStack events from a JSON-lines file (input_files), from
CloudStack's RabbitMQ event bus ([rabbitmq]) and its webhook deliveries ([webhook], on the API),
the same inputs as `kvmeter collector`'s (collector/inputs.py), then the tick. The HTTP API reads
from its own thread.

So the spool's guarantees hold as with Kafka: `kill -9` at any instant loses nothing (unapplied
batches are replayed from the spool at the next start) and bills nothing twice (a batch applied
but not yet acknowledged is re-sent under its stream id and sequence number, and the collector's
stream marks drop it).

The config file has the agent's sections (agent, libvirt, spool, deltas, metrics, traffic), the
collector's (store, usage, api, cloudstack, policy, retention, billing, handoff, balances,
rabbitmq, webhook) and [lifecycle]
(events_file; max_event_bytes as in the collector's); see packaging/config/allinone.toml.example.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import click

from kvmeter.agent import config as agent_config
from kvmeter.collector import balance_watch, reloading, unpriced_gauges
from kvmeter.collector import config as collector_config
from kvmeter.collector.api_auth import NoCredentials
from kvmeter.collector.billing.reads import priced
from kvmeter.collector.billing.tariff_file import TariffError
from kvmeter.collector.cli import _open_store
from kvmeter.collector.credentials import CredentialsError, CredentialSource
from kvmeter.collector.credit_keys import tariff_guard
from kvmeter.collector.feed import Feeder
from kvmeter.collector.input_files import EventsFile
from kvmeter.collector.inputs import InputUnavailable, event_inputs
from kvmeter.collector.metrics import Metrics
from kvmeter.collector.policy_change import put_in_force_at_start
from kvmeter.collector.prune import PruneJob, Pruner
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store
from kvmeter.logs import setup_logging
from kvmeter.pipeline.handoff import InProcessProducer
from kvmeter.reload import Reloads, hold
from kvmeter.tomlconfig import ConfigError, read_toml, schema_problems

log = logging.getLogger(__name__)

DEFAULT_PATH = "/etc/kvmeter/allinone.toml"
AGENT_SECTIONS = ("agent", "libvirt", "spool", "deltas", "metrics", "traffic")
COLLECTOR_SECTIONS = (
    "store",
    "usage",
    "api",
    "cloudstack",
    "policy",
    "retention",
    "billing",
    "handoff",
    "balances",
    "rabbitmq",
    "webhook",
)
LIFECYCLE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    # max_event_bytes is the collector's key (validated there), shared with collector.toml
    "properties": {"events_file": {"type": "string", "minLength": 1}, "max_event_bytes": {}},
}


@dataclass(frozen=True)
class AllInOneConfig:
    agent: agent_config.AgentConfig
    collector: collector_config.CollectorConfig
    events_file: Path | None


def from_dict(doc: dict[str, Any], source: str = "config", base: Path | None = None) -> AllInOneConfig:
    """Validate every section with its owner's rules and report every problem at once."""
    problems: list[str] = []
    known = {*AGENT_SECTIONS, *COLLECTOR_SECTIONS, "lifecycle"}
    problems += [
        f"{key}: unknown section (allowed: {', '.join(sorted(known))})" for key in doc if key not in known
    ]
    agent_cfg = collector_cfg = None
    try:
        agent_cfg = agent_part(doc, source)
    except ConfigError as exc:
        problems += exc.problems
    lifecycle = doc.get("lifecycle", {})
    try:
        part = {k: v for k, v in doc.items() if k in COLLECTOR_SECTIONS}
        if isinstance(lifecycle, dict) and "max_event_bytes" in lifecycle:
            part["lifecycle"] = {"max_event_bytes": lifecycle["max_event_bytes"]}
        collector_cfg = collector_config.from_dict(part, source, base=base)
    except ConfigError as exc:
        problems += list(exc.problems)
    problems += schema_problems({"properties": {"lifecycle": LIFECYCLE_SCHEMA}}, {"lifecycle": lifecycle})
    if collector_cfg is not None and collector_cfg.webhook_secret and not collector_cfg.api.enabled:
        problems.append("webhook: deliveries come to the API: api.enabled = true")
    if problems or agent_cfg is None or collector_cfg is None:
        raise ConfigError(source, problems)
    events = lifecycle.get("events_file")
    events_file = None if not events else (Path(events) if base is None else base / events)
    return AllInOneConfig(agent_cfg, collector_cfg, events_file)


def agent_part(doc: dict[str, Any], source: str) -> agent_config.AgentConfig:
    """The agent's sections of an all-in-one file, validated by the agent's rules."""
    return agent_config.validate({k: v for k, v in doc.items() if k in AGENT_SECTIONS}, source)


def load(path: str | Path) -> AllInOneConfig:
    path = Path(path)
    return from_dict(read_toml(path), str(path), base=path.parent)


def _wall_ms() -> int:
    return int(time.time() * 1000)


class AllInOne:
    """The agent, an in-process collector on SQLite (or any store URL), the lifecycle file, the API."""

    def __init__(
        self, cfg: AllInOneConfig, *, clock: Callable[[], int] = _wall_ms, store: Store | None = None
    ):
        """`store`: the config's, already opened and migrated (`kvmeter run` opens it first, to
        say clearly why it cannot)."""
        from kvmeter.agent.cli import build_agent

        self.cfg = cfg
        if store is None:
            store = Store(cfg.collector.db_url, outbox=cfg.collector.handoff is not None)
            store.migrate()
        self.store = store
        # [billing] tariff_file (/v1/costs, SIGHUP), priced into the items before anything makes
        # them (a changed [policy] recomputed at start adjusts final windows)
        self.tariffs = priced(self.store, cfg.collector)
        if self.tariffs is not None:  # TariffError: its currency is not the credits held
            self.tariffs.guarded(tariff_guard(self.store))
        self.collector = Collector(self.store, cfg.collector.settings, clock)
        put_in_force_at_start(self.collector)  # a changed [policy]: the whole store recomputed
        self.metrics = Metrics()
        self.metrics.watch_store(self.store, self.collector.horizon_start)
        c = self.collector
        self.metrics.watch_memory(
            lambda: c.resident, lambda: len(c.evicted), lambda: (len(c.hints), len(c.witness))
        )
        self.relay: Any = None
        if cfg.collector.handoff is not None:  # billable items to the topic / webhook
            from kvmeter.collector import outbox_relay

            self.relay = outbox_relay.start(self.store, cfg.collector.handoff, self.metrics.registry)
        inputs: list[Any] = []
        if cfg.events_file:  # its delivery order kept in the store: monotonic across restarts
            lost = self.metrics.events_file_lost.inc
            inputs.append(EventsFile(cfg.events_file, store=self.store, lost=lost))
        bus = event_inputs(cfg.collector.rabbitmq, cfg.collector.webhook_secret)  # InputUnavailable
        inputs += bus.inputs
        self.webhook = bus.webhook
        if cfg.collector.cloudstack is not None:  # passes against CloudStack's API, one more input
            from kvmeter.collector.reconciler import for_config

            inputs.append(for_config(self.collector, cfg.collector.cloudstack, self.metrics))
        self.feeder = Feeder(
            self.collector, inputs, self.metrics, tick_seconds=cfg.collector.tick_seconds, poll_timeout=0
        )
        self.agent = build_agent(
            cfg.agent,
            read_only=False,
            producer_factory=lambda _config: InProcessProducer(
                self.collector, idle=self.idle, applied=self.feeder.applied, failed=self.feeder.failed
            ),
        )
        self.api: Any = None
        self.credentials: CredentialSource | None = None  # the API's configured ones (SIGHUP)
        retention = cfg.collector.retention
        self.pruning = (
            PruneJob(
                Pruner(self.store, retention, clock, lambda: self.collector.settings.policy),  # SIGHUP's
                retention.interval_ms / 1000,
                self.metrics,
            )
            if retention.enabled
            else None
        )
        tariffs = self.tariffs
        unpriced_gauges.watch(tariffs, self.store, self.metrics.registry)
        self.watching: threading.Event | None = None  # [balances]: the watcher's, once running
        self.balances = balance_watch.book_for(
            cfg.collector.balances, self.store, lambda: None if tariffs is None else tariffs.current
        )

    def idle(self) -> None:
        """The collector's own work between two polls: new lifecycle events, then the tick."""
        self.feeder.step()

    def start_api(self) -> str | None:
        api = self.cfg.collector.api
        if not api.enabled:
            return None
        from kvmeter.collector.api import serve

        self.credentials = CredentialSource(api.credentials, api.credentials_file)
        self.api = serve(
            self.store,
            api.host,
            api.port,
            credentials=self.credentials,
            metrics=self.metrics,
            status=self.feeder.status,  # /health: failing while a store write is retried
            settings=self.cfg.collector.settings,
            tariffs=self.tariffs,
            balances=self.balances,
            paging=api.paging,
            webhook=self.webhook,
        )
        threading.Thread(target=self.api.run, name="api", daemon=True).start()
        return self.api.url

    def run(self) -> None:
        """Until agent.stop_event: poll, apply, follow events, tick; then a last poll and flush."""
        self.feeder.start()
        if self.pruning is not None:
            self.pruning.start()
        self.watching = balance_watch.watch(self.cfg.collector.balances, self.balances, self.metrics)
        self.idle()  # events already on file first: owners known before the first bytes
        self.agent.start()
        try:
            self.agent.run()
            self.idle()
        finally:
            self.agent.close()

    def stop(self) -> None:
        self.agent.stop_event.set()
        self.feeder.stop()
        if self.relay is not None:
            self.relay.stop()

    def close(self) -> None:
        if self.pruning is not None:
            self.pruning.stop()
        if self.watching is not None:
            self.watching.set()
        if self.api is not None:
            self.api.close()
        if self.relay is not None:
            self.relay.close()
        self.feeder.close()
        self.store.close()


def reloads(config_path: str, pipeline: AllInOne) -> Reloads:
    """What SIGHUP reads again, run between two polls. Each part reads the config file again but
    takes only its own sections, as `kvmeter collector` does (collector/reloading.py) and the
    agent its sections: a mistake in one (a tariff file caught mid-edit) refuses that reload
    alone, never a credential's removal. The rest is read at start only."""
    path = Path(config_path)
    out = Reloads(lambda what: pipeline.metrics.reload_failures.labels(what).inc())

    def traffic_rules() -> str:
        rules = agent_part(read_toml(path), config_path).traffic
        pipeline.agent.set_traffic_rules(rules)
        return f"{len(rules.rules)} rule(s) (defaults included), fallback {rules.fallback}"

    out.add("traffic rules", traffic_rules)
    out.add("router owners", reloading.router_owners(path, pipeline.collector))
    out.add("policy", reloading.billing_policy(path, pipeline.collector))
    if pipeline.credentials is not None:
        out.add("credentials", reloading.api_credentials(path, pipeline.credentials))
        out.apart("credentials")  # a removed credential must not wait for the next poll
    if pipeline.tariffs is not None:  # the file [billing] names now, as `kvmeter collector` does
        out.add("tariff", reloading.tariff(path, pipeline.tariffs))
    return out


@click.command("run")
@click.option(
    "--all-in-one", "all_in_one", is_flag=True, required=True, help="Agent and collector in one process."
)
@click.option("--config", "config_path", default=DEFAULT_PATH, show_default=True, help="TOML config.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None)
def run(all_in_one: bool, config_path: str, log_level: str | None) -> None:  # noqa: FBT001
    """Run agent and collector in one process with SQLite and no Kafka (one host, a lab, a first look)."""
    if not all_in_one:
        raise click.UsageError(
            "only --all-in-one is supported: run `kvmeter agent` and `kvmeter collector` apart"
        )
    held = hold()  # first: a start may recompute the whole store under a changed [policy]
    try:
        cfg = load(config_path)
    except ConfigError as exc:
        click.echo(f"kvmeter run: invalid config {exc}", err=True)
        sys.exit(2)
    setup_logging(log_level or cfg.agent.log_level)
    try:
        store = _open_store(cfg.collector.db_url, outbox=cfg.collector.handoff is not None)
    except click.ClickException as exc:
        click.echo(f"kvmeter run: {exc.message}", err=True)
        sys.exit(1)
    try:
        pipeline = AllInOne(cfg, store=store)
    except InputUnavailable as exc:
        click.echo(f"kvmeter run: {config_path}: {exc}", err=True)
        sys.exit(2)
    except TariffError as exc:  # the tariff against the credits held: as a tariff that does not load
        store.close()
        click.echo(f"kvmeter run: invalid config {ConfigError(config_path, exc.config_problems())}", err=True)
        sys.exit(2)

    def _stop(signum: int, _frame: FrameType | None) -> None:
        log.info("%s: last poll, apply, exit", signal.Signals(signum).name)
        pipeline.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        url = pipeline.start_api()
    except (NoCredentials, CredentialsError) as exc:
        pipeline.close()
        click.echo(f"kvmeter run: {config_path}: {exc}", err=True)
        sys.exit(2)
    # SIGHUP: traffic rules, router owners, the policy, credentials and the tariff read again.
    pipeline.feeder.reloads = reloads(config_path, pipeline)
    pipeline.feeder.reloads.install(held=held)
    if cfg.agent.metrics_enabled:
        pipeline.agent.metrics.serve(cfg.agent.metrics_address, cfg.agent.metrics_port)
    if url:
        log.info("API on %s", url)
    try:
        pipeline.run()
    finally:
        pipeline.close()
