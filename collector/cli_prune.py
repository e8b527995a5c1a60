"""`kvmeter prune`: one retention pass over a store, by the collector config's [retention]."""

from __future__ import annotations

import time
from pathlib import Path

import click

from kvmeter.collector.cli import DEFAULT_CONFIG, _open_store
from kvmeter.collector.cli_dead_letters import _config
from kvmeter.collector.prune import Busy, Pruner
from kvmeter.collector.retention import TABLES


@click.command()
@click.option(
    "--config",
    "config_path",
    default=None,
    help=f"collector.toml or allinone.toml ([retention]; default {DEFAULT_CONFIG} when it exists).",
)
@click.option("--db", "db_url", default=None, help="Store URL (default: the config's [store] url).")
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
def prune(config_path: str | None, db_url: str | None, dry_run: bool) -> None:  # noqa: FBT001 - click flag
    """Delete what the retention policy no longer keeps (never what a window, report or rebuild needs)."""
    if config_path is None and Path(DEFAULT_CONFIG).exists():
        config_path = DEFAULT_CONFIG
    cfg = _config(config_path)
    store = _open_store(db_url or cfg.db_url)
    try:
        counts = Pruner(store, cfg.retention, lambda: int(time.time() * 1000), cfg.settings.policy).run(
            dry_run=dry_run
        )
    except Busy as exc:
        raise click.ClickException(f"{exc}; try again later") from None
    finally:
        store.close()
    verb = "would delete" if dry_run else "deleted"
    width = max(len(name) for names in TABLES.values() for name in names)
    for kind, names in TABLES.items():
        age = cfg.retention.age(kind)
        for name in names:
            rows = "kept forever" if age is None else f"{verb} {counts.get(name, 0)}"
            click.echo(f"{name:<{width}}  {rows}")
