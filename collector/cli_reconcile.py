"""`kvmeter reconcile` (one pass against CloudStack's API, or --dry-run: what it would change)
and `kvmeter corrections` (what reconciliation changed, with source and reason)."""

from __future__ import annotations

import json
from typing import Any

import click

from kvmeter.collector import report
from kvmeter.collector.cli import _open_config_store, _open_store, _wall_ms
from kvmeter.collector.cli_dead_letters import _config
from kvmeter.collector.cs_snapshot import SnapshotError
from kvmeter.collector.reconcile import Correction, Findings
from kvmeter.collector.service import Collector
from kvmeter.collector.store.correction_pages import page_corrections

_PAGE = 1000


def _line(c: Correction) -> str:
    return f"{report.iso(c.time_ms)}  {c.event_type:<16} {c.resource_uuid}  {c.account or '-'}  {c.reason}"


def _print(found: Findings, *, verb: str) -> None:
    for c in found.corrections:
        click.echo(_line(c))
    for note in found.notes:
        click.echo(f"left alone: {note}")
    click.echo(
        f"{len(found.corrections)} correction(s) {verb}, {len(found.notes)} difference(s) left alone",
        err=True,
    )


@click.command()
@click.option(
    "--config",
    "config_path",
    default="/etc/kvmeter/collector.toml",
    show_default=True,
    help="collector.toml or allinone.toml ([store], [cloudstack]).",
)
@click.option("--dry-run", is_flag=True, help="Print what the pass would change; change nothing.")
def reconcile(config_path: str, dry_run: bool) -> None:  # noqa: FBT001 - click passes flags by position
    """One reconciliation pass against CloudStack's API ([cloudstack] of the config)."""
    from kvmeter.collector.cs_client import ApiUnavailable
    from kvmeter.collector.reconciler import for_config

    cfg = _config(config_path)  # a collector's or an all-in-one's file, both reconcile
    if cfg.cloudstack is None:
        raise click.ClickException(f"{config_path}: no [cloudstack] section")
    store, _tariffs = _open_config_store(cfg)
    try:
        reconciler = for_config(Collector(store, cfg.settings, _wall_ms), cfg.cloudstack)
        try:
            snapshot = reconciler.source(_wall_ms())
            found = reconciler.plan(snapshot)
        except (ApiUnavailable, SnapshotError) as exc:
            raise click.ClickException(f"no pass: {exc}") from None
        if not dry_run:
            reconciler.apply(snapshot)
        _print(found, verb="would be made" if dry_run else "made")
    finally:
        store.close()


@click.command()
@click.option("--db", "db_url", required=True, help="Store URL: sqlite:///path or postgresql://...")
@click.option("--account", default=None, help="Only this account's corrections.")
@click.option("--resource", default=None, help="Only this resource's corrections.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def corrections(db_url: str, account: str | None, resource: str | None, fmt: str) -> None:
    """List the corrections reconciliation applied (source, reason, time)."""
    store = _open_store(db_url)
    rows: list[dict[str, Any]] = []
    after: tuple[int, int] | None = None
    try:  # every one, a page at a time (as /v1/corrections pages), not the first 1000 only
        with store.read() as conn:
            while True:
                page, after = page_corrections(
                    conn,
                    accounts=frozenset({account}) if account else None,
                    resource=resource,
                    start_ms=0,
                    end_ms=2**62,
                    limit=_PAGE,
                    after=after,
                )
                rows += page
                if len(page) < _PAGE:
                    break
    finally:
        store.close()
    if fmt == "json":
        click.echo(json.dumps(rows, indent=1, sort_keys=True))
        return
    for row in rows:
        click.echo(
            f"{report.iso(row['time_ms'])}  {row['event_type']:<16} {row['resource']}  "
            f"{row['account'] or '-'}  {row['source']}: {row['reason']}"
        )
    click.echo(f"{len(rows)} correction(s)", err=True)
