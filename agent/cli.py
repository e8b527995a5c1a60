"""`kvmeter agent`: run the agent, or poll once and print the batch it would send."""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import click

from kvmeter.agent.config import DEFAULT_PATH, AgentConfig, ConfigError, load
from kvmeter.logs import setup_logging

log = logging.getLogger("kvmeter.agent")


def build_agent(
    config: AgentConfig, *, read_only: bool, producer_factory: Callable[[dict[str, Any]], Any] | None = None
) -> Any:
    """The agent with its real parts (imported here: they need libvirt and netlink).

    `producer_factory` replaces the Kafka producer (the all-in-one hands batches to an
    in-process collector); the spool and its acknowledgements work the same either way."""
    from kvmeter.agent.counters import read_boot_id
    from kvmeter.agent.daemon import Agent
    from kvmeter.agent.inventory import Inventory
    from kvmeter.agent.metrics import AgentMetrics
    from kvmeter.agent.publish import Publisher
    from kvmeter.agent.spool import Spool
    from kvmeter.agent.topology import Topology

    metrics = AgentMetrics(enabled=config.metrics_enabled)
    spool = Spool(
        Path(config.state_dir) / "spool",
        max_bytes=config.spool_max_bytes,
        max_age_ms=int(config.spool_max_age_seconds * 1000),
        segment_bytes=config.spool_segment_bytes,
        read_only=read_only,
        on_drop=metrics.spool_dropped,
    )
    publisher = None
    if not read_only and producer_factory is None:
        config = _fitted_to_topic(config)
    if not read_only:
        publisher = Publisher(
            spool,
            bootstrap=config.kafka_bootstrap,
            topic=config.kafka_topic,
            key=config.host_id,
            properties=config.kafka_properties,
            max_in_flight=config.kafka_max_in_flight,
            metrics=metrics,
            producer_factory=producer_factory,
        )
    return Agent(
        config,
        inventory=Inventory(config.libvirt_uri, resync_seconds=config.libvirt_resync_seconds),
        topology=Topology(config.traffic),
        spool=spool,
        boot_id=read_boot_id(),
        publisher=publisher,
        metrics=metrics,
    )


def _fitted_to_topic(config: AgentConfig) -> AgentConfig:
    """The config with the topic's size limit, when the broker states one: polls are then cut
    into batches the broker takes (a batch it refuses as too large would stay in the spool)."""
    from dataclasses import replace

    from kvmeter.agent.kafka_client import topic_max_message_bytes

    limit = topic_max_message_bytes(config.kafka_bootstrap, config.kafka_topic, config.kafka_properties)
    if limit is None:
        return config
    fitted = replace(config, kafka_topic_max_bytes=limit)
    if fitted.batch_bytes < config.batch_bytes:
        log.info(
            "topic %s takes records of up to %d bytes: polls go out in batches of at most %d bytes",
            config.kafka_topic,
            limit,
            fitted.batch_bytes,
        )
    return fitted


def _print_batch(batch: Any, fmt: str) -> None:
    if fmt == "json":
        from google.protobuf.json_format import MessageToDict

        click.echo(
            json.dumps(MessageToDict(batch, preserving_proto_field_name=True), indent=2, sort_keys=True)
        )
    else:
        from google.protobuf import text_format

        click.echo(text_format.MessageToString(batch), nl=False)


def _cannot_start(what: str, exc: OSError, setting: str) -> None:
    """A state directory or metrics port the agent cannot have: one line saying which, exit 1
    (systemd retries), never a traceback."""
    click.echo(f"kvmeter agent: cannot start: {what}: {exc.strerror or exc} ({setting})", err=True)
    sys.exit(1)


def _built(config: AgentConfig, *, read_only: bool) -> Any:
    try:
        return build_agent(config, read_only=read_only)
    except OSError as exc:
        if exc.filename is None or not str(exc.filename).startswith(str(config.state_dir)):
            raise  # not the state directory: nothing the operator's settings name
        _cannot_start(str(exc.filename), exc, f"agent.state_dir = {config.state_dir!r}")


def _run_once(config: AgentConfig, fmt: str, window: float) -> None:
    agent = _built(config, read_only=True)
    agent.start()
    try:
        if not agent.resumed:
            # Nothing saved to measure from: take a baseline and measure over a short window.
            # (a dry run leaves the engine advanced: the baseline is what the window measures from)
            agent.poll_once(dry_run=True)
            time.sleep(window)
        _print_batch(agent.poll_once(dry_run=True), fmt)
    finally:
        agent.close()


def _traffic_rules(config_path: str, agent: Any) -> Callable[[], str]:
    """SIGHUP: the config file read again whole (a bad one refuses the reload), its traffic
    rules put in force; the rest of it is read at start only."""

    def reload() -> str:
        rules = load(config_path).traffic
        agent.set_traffic_rules(rules)
        return f"{len(rules.rules)} rule(s) (defaults included), fallback {rules.fallback}"

    return reload


def _run_daemon(config: AgentConfig, config_path: str) -> int:
    from kvmeter.reload import Reloads, hold

    held = hold()  # first: the agent is built over seconds
    agent = _built(config, read_only=False)
    agent.reloads = Reloads(lambda what: agent.metrics.reload_failures.labels(what).inc())
    agent.reloads.add("traffic rules", _traffic_rules(config_path, agent))
    agent.reloads.install(then=agent.wake, held=held)

    def stop(signum: int, _frame: Any) -> None:
        log.info("%s: last poll, flush, exit", signal.Signals(signum).name)
        agent.stop_event.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if config.metrics_enabled:
        try:
            agent.metrics.serve(config.metrics_address, config.metrics_port)
        except OSError as exc:  # the port taken, the address not this host's
            agent.close()
            where = f"{config.metrics_address}:{config.metrics_port}"
            _cannot_start(f"metrics on {where}", exc, "[metrics] address, port")
    replay = len(agent.spool.pending())
    if replay:
        log.info("replaying %d undelivered batches from the spool", replay)
    agent.start()
    try:
        agent.run()
    finally:
        agent.close()
    return 0


@click.command("agent")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=DEFAULT_PATH,
    show_default=True,
    help="TOML config file.",
)
@click.option("--once", is_flag=True, help="Poll once and print the batch it would send (sends nothing).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="--once output.",
)
@click.option(
    "--window",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="--once without saved state: seconds between the baseline and the measured poll.",
)
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None)
def agent(config_path: str, once: bool, fmt: str, window: float, log_level: str | None) -> None:  # noqa: FBT001
    """Meter this KVM host's VM interfaces and publish measure batches to Kafka."""
    try:
        config = load(config_path) if (config_path != DEFAULT_PATH or Path(config_path).exists()) else None
    except ConfigError as exc:
        click.echo(f"kvmeter agent: invalid config {exc}", err=True)
        sys.exit(2)
    if config is None:
        if not once:
            click.echo(f"kvmeter agent: config {config_path} not found", err=True)
            sys.exit(2)
        from kvmeter.agent.config import validate

        config = validate({})
    setup_logging(log_level or ("warning" if once else config.log_level))
    if not once:
        from kvmeter.agent.kafka_client import property_problems

        problems = property_problems(config.kafka_bootstrap, config.kafka_properties)
        if problems:
            click.echo(f"kvmeter agent: invalid config {ConfigError(config_path, problems)}", err=True)
            sys.exit(2)
    if once:
        _run_once(config, fmt, window)
        return
    sys.exit(_run_daemon(config, config_path))
