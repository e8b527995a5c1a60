"""`kvmeter costs`: each account's costs this month (or a named one) from a store, rated under a
tariff file, as the API's /v1/costs rates them."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from kvmeter.collector import cost_report
from kvmeter.collector.api_params import BadRequest, month_ms
from kvmeter.collector.billing import month_bounds, months_costs
from kvmeter.collector.billing.tariff import Tariff
from kvmeter.collector.billing.tariff_file import TariffError
from kvmeter.collector.billing.tariff_file import load as load_tariff
from kvmeter.collector.cli import _open_store
from kvmeter.collector.cli_dead_letters import _config


def _tariff_and_db(
    config_path: str | None, tariff_path: str | None, db_url: str | None
) -> tuple[Tariff, str]:
    # A collector's or an all-in-one's file, as the other commands on a store take it.
    cfg = None if config_path is None else _config(config_path)
    billable = cfg.settings.billable if cfg is not None else frozenset({"public"})
    tariff = cfg.tariff if cfg is not None else None
    if tariff_path is not None:
        try:
            tariff = load_tariff(Path(tariff_path), billable)
        except TariffError as exc:
            lines = "\n  ".join(exc.problems)
            raise click.ClickException(f"invalid tariff {tariff_path}:\n  {lines}") from None
    if tariff is None:
        raise click.UsageError("no tariff: give --tariff, or --config with [billing] tariff_file")
    url = db_url or (cfg.db_url if cfg is not None else None)
    if url is None:
        raise click.UsageError("no store: give --db, or --config with [store] url")
    return tariff, url


@click.command()
@click.option("--db", "db_url", default=None, help="Store URL (default: the config's).")
@click.option("--tariff", "tariff_path", default=None, help="Tariff file (default: the config's).")
@click.option(
    "--config", "config_path", default=None, help="collector.toml or allinone.toml: its store and tariff."
)
@click.option("--account", default=None, help="Only this account (uuid); default: every account.")
@click.option("--month", "month_text", default=None, help="yyyy-MM (UTC); default: this month.")
@click.option("--format", "fmt", type=click.Choice(cost_report.FORMATS), default="table", show_default=True)
@click.option("--items", is_flag=True, help="JSON: every record's and adjustment's cost too.")
def costs(
    db_url: str | None,
    tariff_path: str | None,
    config_path: str | None,
    account: str | None,
    month_text: str | None,
    fmt: str,
    items: bool,  # noqa: FBT001 - click passes flags by position
) -> None:
    """Costs per account: so far this month by usage type and resource, and projected."""
    tariff, url = _tariff_and_db(config_path, tariff_path, db_url)
    now = int(time.time() * 1000)
    try:
        month = month_ms(month_text, now)
    except BadRequest as exc:
        raise click.BadParameter(str(exc), param_hint="--month") from None
    store = _open_store(url)
    try:
        accounts = None if account is None else frozenset({account})
        months = months_costs(store, tariff, accounts, now, month_ms=month)
    finally:
        store.close()
    start, end = month_bounds(month)
    text = cost_report.render(
        months, fmt, currency=tariff.currency, start_ms=start, end_ms=end, as_of_ms=now, items=items
    )
    sys.stdout.write(text)
