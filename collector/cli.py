"""`kvmeter collector`, `kvmeter ingest` and `kvmeter usage`."""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

import click

from kvmeter.collector import balance_watch, report, unpriced_gauges
from kvmeter.collector import config as config_mod
from kvmeter.collector.api_params import MAX_USAGE_TYPE
from kvmeter.collector.billing.reads import priced
from kvmeter.collector.billing.tariff_file import TariffError, TariffSource
from kvmeter.collector.credentials import CredentialsError, CredentialSource
from kvmeter.collector.errors import BadInput
from kvmeter.collector.model import Outcome
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store, StoreTooNew, shown_url, without_secret
from kvmeter.logs import setup_logging

DEFAULT_CONFIG = "/etc/kvmeter/collector.toml"
_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


def _wall_ms() -> int:
    return int(time.time() * 1000)


MAX_ID = 2**63 - 1  # a store's ids are 64-bit integers: a larger one makes its driver raise
ROW_ID = click.IntRange(1, MAX_ID)


def _unopenable(what: str, url: str, exc: Exception) -> click.ClickException:
    """`what` at `url` cannot be opened: one line, the URL's passwords never shown (stderr goes
    to the journal)."""
    return click.ClickException(f"cannot open {what} {shown_url(url)}: {without_secret(str(exc), url)}")


def _open_store(url: str, *, outbox: bool = False) -> Store:
    """The store, migrated; one that cannot be opened is a clear error."""
    try:
        store = Store(url, outbox=outbox)
        store.migrate()
    except Exception as exc:
        raise _unopenable("the store", url, exc) from None
    return store


def _open_config_store(
    cfg: config_mod.CollectorConfig, db_url: str | None = None
) -> tuple[Store, TariffSource | None]:
    """The store as `kvmeter collector` opens it under this config: with [handoff], the outbox
    filled by the transactions that finalize or adjust (their items priced under [billing]);
    and the config's tariff."""
    store = _open_store(db_url or cfg.db_url, outbox=cfg.handoff is not None)
    return store, priced(store, cfg)


def _load_config(path: str | None) -> config_mod.CollectorConfig:
    if path is None:
        return config_mod.CollectorConfig()
    try:
        return config_mod.load(path)
    except config_mod.ConfigError as exc:
        raise invalid_config(path, exc.problems) from None


def invalid_config(path: str, problems: list[str]) -> click.ClickException:
    """A config's problems, one a line, as every command on a config says them."""
    lines = "\n  ".join(problems)
    return click.ClickException(f"invalid configuration {path}:\n  {lines}")


def _summary(out: Outcome) -> str:
    return (
        f"{out.batches} batch(es) applied, {out.duplicates} duplicate(s), {out.measures} measure(s), "
        f"{out.billed_bytes} byte(s) billed, {out.parked - out.unparked} parked, "
        f"{out.quarantined} quarantined; "
        f"{out.events} new event(s), {out.known_events} known; {out.records} record write(s), "
        f"{out.adjustments} adjustment(s), {out.finalized} finalized; {len(out.dead_letters)} dead-lettered"
    )


@click.command()
@click.option(
    "--config", "config_path", default=DEFAULT_CONFIG, show_default=True, help="TOML configuration."
)
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def collector(config_path: str, verbose: bool) -> None:  # noqa: FBT001 - click passes flags by position
    """Consume measures and CloudStack lifecycle events (Kafka, RabbitMQ, webhook) into usage records."""
    from kvmeter.collector.api import serve
    from kvmeter.collector.api_auth import NoCredentials
    from kvmeter.collector.credit_keys import tariff_guard
    from kvmeter.collector.feed import Feeder
    from kvmeter.collector.input_kafka import KafkaInput
    from kvmeter.collector.input_webhook import PATH as WEBHOOK_PATH
    from kvmeter.collector.inputs import Input, InputUnavailable, event_inputs
    from kvmeter.collector.metrics import Metrics
    from kvmeter.collector.policy_change import put_in_force_at_start
    from kvmeter.collector.reloading import collector_reloads
    from kvmeter.reload import hold

    setup_logging("debug" if verbose else "info")
    held = hold()  # first: a start may recompute the whole store under a changed [policy]
    cfg = _load_config(config_path)
    if not (cfg.kafka.bootstrap or cfg.rabbitmq.url or cfg.webhook_secret):
        raise click.ClickException(
            f"{config_path}: the live collector needs an input: kafka.bootstrap, rabbitmq.url or [webhook]"
        )
    if cfg.webhook_secret and not cfg.api.enabled:
        raise click.ClickException(f"{config_path}: [webhook] deliveries come to the API: api.enabled = true")
    store, tariffs = _open_config_store(cfg)
    if tariffs is not None:  # before anything is priced: a tariff in another currency than the credits'
        try:
            tariffs.guarded(tariff_guard(store))
        except TariffError as exc:
            store.close()
            raise invalid_config(config_path, exc.config_problems()) from None
    service = Collector(store, cfg.settings, _wall_ms)
    put_in_force_at_start(service)  # a changed [policy]: the whole store recomputed under it
    metrics = Metrics()
    metrics.watch_store(store, service.horizon_start)
    metrics.watch_memory(
        lambda: service.resident,
        lambda: len(service.evicted),
        lambda: (len(service.hints), len(service.witness)),
    )
    relay = None
    if cfg.handoff is not None:  # billable items from the outbox to the topic / webhook
        from kvmeter.collector import outbox_relay

        relay = outbox_relay.start(store, cfg.handoff, metrics.registry)
    try:  # CloudStack's RabbitMQ bus and webhook: the seam the all-in-one shares
        bus = event_inputs(cfg.rabbitmq, cfg.webhook_secret)
    except InputUnavailable as exc:
        store.close()
        raise click.ClickException(f"{config_path}: {exc}") from None
    inputs: list[Input] = list(bus.inputs)
    webhook = bus.webhook
    if cfg.kafka.bootstrap:
        inputs.append(KafkaInput(cfg.kafka, metrics))  # last: it waits for measures
        if cfg.kafka.rebuild_horizon_days:  # advice only: asked beside the loop, never delays it
            from kvmeter.collector.kafka_history import check_horizon

            threading.Thread(
                target=check_horizon, args=(cfg.kafka, metrics), name="horizon", daemon=True
            ).start()
    if cfg.cloudstack is not None:  # passes against CloudStack's API, one more input
        from kvmeter.collector.reconciler import for_config

        inputs.insert(0, for_config(service, cfg.cloudstack, metrics))
    live = Feeder(service, inputs, metrics, tick_seconds=cfg.tick_seconds)
    credentials: CredentialSource | None = None
    pruning = None
    if cfg.retention.enabled:  # beside the loop, on a thread of its own (collector/prune.py)
        from kvmeter.collector.prune import PruneJob, Pruner

        pruning = PruneJob(
            Pruner(store, cfg.retention, _wall_ms, lambda: service.settings.policy),  # SIGHUP's
            cfg.retention.interval_ms / 1000,
            metrics,
        )
    book = balance_watch.book_for(cfg.balances, store, lambda: None if tariffs is None else tariffs.current)
    unpriced_gauges.watch(tariffs, store, metrics.registry)  # usage the tariff does not price

    def _stop(signum: int, _frame: FrameType | None) -> None:
        logging.getLogger(__name__).info("signal %d: stopping after the current chunk", signum)
        live.stop()
        if relay is not None:
            relay.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    server = None
    if cfg.api.enabled:
        try:
            credentials = CredentialSource(cfg.api.credentials, cfg.api.credentials_file)
            server = serve(
                store,
                cfg.api.host,
                cfg.api.port,
                credentials=credentials,
                metrics=metrics,
                status=live.status,
                webhook=webhook,
                settings=cfg.settings,
                tariffs=tariffs,
                balances=book,
                paging=cfg.api.paging,
            )
        except (NoCredentials, CredentialsError) as exc:
            store.close()
            raise click.ClickException(f"{config_path}: {exc}") from None
        threading.Thread(target=server.run, name="api", daemon=True).start()
        logging.getLogger(__name__).info("API on %s", server.url)
    live.reloads = collector_reloads(
        Path(config_path),
        service,
        credentials,
        lambda what: metrics.reload_failures.labels(what).inc(),
        tariffs,
    )
    live.reloads.install(held=held)  # SIGHUP: router owners, credentials and the tariff read again
    if cfg.kafka.bootstrap:
        logging.getLogger(__name__).info(
            "Kafka: measures %s (group %s), lifecycle %s, on %s", cfg.kafka.measures_topic, cfg.kafka.group,
            cfg.kafka.lifecycle_topic, cfg.kafka.bootstrap,
        )  # fmt: skip
    if cfg.rabbitmq.url:
        logging.getLogger(__name__).info(
            "RabbitMQ: lifecycle from exchange %s, queue %s (%s)", cfg.rabbitmq.exchange, cfg.rabbitmq.queue,
            cfg.rabbitmq.queue_type,
        )  # fmt: skip
    if webhook is not None:
        logging.getLogger(__name__).info("webhook: CloudStack's deliveries on %s", WEBHOOK_PATH)
    logging.getLogger(__name__).info(
        "store %s; window %d s, grace %d s, billable %s; policy %s",
        shown_url(cfg.db_url), cfg.settings.window_ms // 1000,
        cfg.settings.grace_ms // 1000, ",".join(sorted(cfg.settings.billable)),
        cfg.settings.policy.describe(),
    )  # fmt: skip
    if pruning is not None:
        pruning.start()
    balances = balance_watch.watch(cfg.balances, book, metrics)  # [balances]: low-balance alerts
    try:
        live.run()
    except StoreTooNew as exc:  # a newer replica migrated the store: exit 1, systemd restarts us
        raise click.ClickException(f"stopped: {exc}") from None
    finally:
        if balances is not None:
            balances.set()
        if pruning is not None:
            pruning.stop()
        if server is not None:
            server.close()
        if relay is not None:
            relay.close()
        store.close()


@click.command()
@click.option("--db", "db_url", required=True, help="Store URL: sqlite:///path or postgresql://...")
@click.option(
    "--events", "events", multiple=True, type=_FILE, help="CloudStack event-bus JSON lines (repeatable)."
)
@click.option(
    "--measures",
    "measures",
    multiple=True,
    type=_FILE,
    help="Measure batches (protobuf or JSON; repeatable).",
)
@click.option(
    "--config",
    "config_path",
    default=None,
    help="Take usage settings, [handoff] and [billing] from this config.",
)
@click.option("--window-seconds", type=int, default=None, help="Usage window (default 3600 or the config's).")
@click.option(  # as the config's grace_seconds: a negative one would finalize windows still open
    "--grace-seconds", type=click.IntRange(min=0), default=None, help="Grace before a window is final."
)
@click.option("--billable", multiple=True, help="Billable traffic type (repeatable; default public).")
@click.option(
    "--now", "now_text", default=None, help="Evaluate as of this instant (audits); default: the clock."
)
def ingest(
    db_url: str,
    events: tuple[Path, ...],
    measures: tuple[Path, ...],
    config_path: str | None,
    window_seconds: int | None,
    grace_seconds: int | None,
    billable: tuple[str, ...],
    now_text: str | None,
) -> None:
    """Apply event and measure files to a usage store, then close the windows it can."""
    from kvmeter.collector.ingest import ingest as run_ingest

    if not events and not measures:
        raise click.UsageError("nothing to ingest: give --events and/or --measures")
    cfg = _load_config(config_path)
    settings = cfg.settings
    overrides: dict[str, object] = {}
    if window_seconds is not None:
        overrides["window_ms"] = window_seconds * 1000
    if grace_seconds is not None:
        overrides["grace_ms"] = grace_seconds * 1000
    if billable:
        overrides["billable"] = frozenset(billable)
    settings = dataclasses.replace(settings, **overrides)  # type: ignore[arg-type]
    clock = _wall_ms
    if now_text is not None:
        try:
            fixed = report.parse_when(now_text)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--now") from None
        clock = lambda: fixed  # noqa: E731
    # As `kvmeter collector` opens it under this config: with [handoff], what ingest finalizes
    # or adjusts is handed off to billing too, priced under [billing].
    store, _tariffs = _open_config_store(cfg, db_url)
    if not store.outbox and store.outbox_used():
        store.close()
        raise click.ClickException(
            f"{shown_url(db_url)} hands usage off to billing ([handoff]): give --config with the"
            " collector's file, so what ingest finalizes or adjusts is handed off too"
        )
    try:
        service = Collector(store, settings, clock)
    except BadInput as exc:
        store.close()
        raise click.ClickException(exc.message) from None
    try:
        out = run_ingest(service, list(events), list(measures))
    finally:
        store.close()
    click.echo(_summary(out), err=True)
    for letter in out.dead_letters[:20]:
        click.echo(
            f"  dead letter {letter.source} {letter.origin}: {letter.reason}: {letter.message}", err=True
        )


@click.command()
@click.option("--db", "db_url", required=True, help="Store URL: sqlite:///path or postgresql://...")
@click.option(
    "--start", "start_text", required=True, help="From (yyyy-MM-dd, ISO 8601 or ms), windows starting here."
)
@click.option(
    "--end", "end_text", required=True, help="To (exclusive; a bare date means the end of that day)."
)
@click.option("--account", default=None, help="Account uuid.")
@click.option(
    "--type",
    "usage_type",
    type=click.IntRange(0, MAX_USAGE_TYPE),  # as the API's `type`
    default=None,
    help="CloudStack usage type id (1-5).",
)
@click.option("--resource", default=None, help="Resource uuid.")
@click.option("--format", "fmt", type=click.Choice(report.FORMATS), default="table", show_default=True)
def usage(
    db_url: str,
    start_text: str,
    end_text: str,
    account: str | None,
    usage_type: int | None,
    resource: str | None,
    fmt: str,
) -> None:
    """Report usage records (net of adjustments) from a store."""
    try:
        start = report.parse_when(start_text)
        end = report.parse_when(end_text, end_of_day=True)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if end <= start:
        raise click.BadParameter("--end must be after --start")
    store = _open_store(db_url)
    try:
        rows = store.usage(start, end, account=account, usage_type=usage_type, resource=resource)
        stats = store.stats(_wall_ms() - config_mod.CollectorConfig().settings.park_horizon_ms)
        directory = None
        if fmt == "cloudstack":  # the same owner and resource facts as /client/api shows
            from kvmeter.collector.api_cloudstack import load_directory

            with store.read() as conn:
                directory = load_directory(store, conn)
    finally:
        store.close()
    sys.stdout.write(report.render(rows, fmt, directory))
    if fmt == "table":  # the rest of the byte count, for whoever audits the numbers above
        click.echo(
            f"store: {stats['parked_bytes']} B parked without a known owner "
            f"({stats['reported_unattributed_bytes']} B of them reported as unattributed), "
            f"{stats['quarantined_bytes']} B quarantined, "
            f"{stats['unbilled_bytes']} B of non-billable traffic, "
            f"{stats['dead_letters']} dead letter(s), {stats['missing_batches']} batch(es) never arrived",
            err=True,
        )
