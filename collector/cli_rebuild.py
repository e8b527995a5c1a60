"""`kvmeter rebuild --into URL`: a new store from the topics and the live store's raw events,
then its usage compared with the live store's by account, usage type and window."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import sqlalchemy as sa

from kvmeter.collector.cli import DEFAULT_CONFIG, _load_config, _open_store, _unopenable, _wall_ms
from kvmeter.collector.store import MIGRATIONS, Store, engine_url, policies, shown_url
from kvmeter.logs import setup_logging

FAR = 2**62


def _live_store(url: str) -> Store:
    """The store to compare with, read only (never migrated from here). One that is not there
    (a mistyped path, another database) is refused before the replay, not found out after it
    with a traceback, nor made as an empty file."""
    path = url.split("///", 1)[1].split("?", 1)[0] if url.startswith("sqlite") and "///" in url else ""
    if path and path != ":memory:" and not Path(path).is_file():
        raise click.ClickException(f"the live store {url} does not exist: check --live or [store] url")
    try:
        live = Store(url)
        with live.engine.connect() as conn:
            kept = sa.inspect(conn).has_table("usage_records")
    except Exception as exc:
        raise _unopenable("the live store", url, exc) from None
    if not kept:
        live.close()
        raise click.ClickException(f"the live store {shown_url(url)} holds no kvmeter usage: check --live")
    # Read by this release's queries: one an older release wrote lacks their columns
    at, latest = live.version(), max(version for version, _ in MIGRATIONS)
    if at < latest:
        live.close()
        raise click.ClickException(
            f"the live store {shown_url(url)} is at schema version {at}, older than this kvmeter's "
            f"{latest}: start this release's collector on it first (it migrates the store), then rebuild"
        )
    return live


@click.command()
@click.option(
    "--config", "config_path", default=DEFAULT_CONFIG, show_default=True, help="The collector's TOML."
)
@click.option(
    "--into", "into_url", required=True, help="The new store (must be empty): sqlite:///path or a DSN."
)
@click.option("--live", "live_url", default=None, help="The store to compare with (default: the config's).")
@click.option(
    "--windows",
    type=click.Choice(["final", "all"]),
    default="final",
    show_default=True,
    help="Compare the windows final in the live store, or all (open ones still grow in both).",
)
@click.option("--check", is_flag=True, help="Exit 1 when the rebuilt usage differs from the live store's.")
@click.option("--limit", type=int, default=50, show_default=True, help="Differences listed at most.")
def rebuild(
    config_path: str,
    into_url: str,
    live_url: str | None,
    windows: str,
    check: bool,  # noqa: FBT001 - click passes flags by position
    limit: int,
) -> None:
    """Replay the topics and the stored raw events into a new store, then diff it with the live one."""
    from kvmeter.collector.kafka_history import HistoryError
    from kvmeter.collector.rebuild import RebuildError
    from kvmeter.collector.rebuild import rebuild as run_rebuild
    from kvmeter.collector.store.window_totals import window_totals
    from kvmeter.collector.usage_diff import merge_differences, render

    setup_logging("warning")
    cfg = _load_config(config_path)
    live_url = live_url or cfg.db_url
    if engine_url(into_url) == engine_url(live_url):
        raise click.UsageError("--into names the live store: give a new one")
    live = _live_store(live_url)
    into = _open_store(into_url)
    try:
        try:
            done = run_rebuild(
                cfg.settings,
                cfg.kafka,
                live,
                into,
                _wall_ms,
                progress=lambda line: click.echo(line, err=True),
            )
        except (RebuildError, HistoryError) as exc:
            raise click.ClickException(str(exc)) from None
        policies.note_policy(into, cfg.settings.policy, _wall_ms())  # the policy its records follow
        out = done.outcome
        click.echo(
            f"rebuilt: {out.batches} batch(es), {out.duplicates} duplicate(s), {out.billed_bytes} byte(s) "
            f"billed, {out.events} event(s) ({out.known_events} seen twice), {len(out.dead_letters)} "
            f"dead-lettered, {out.finalized} record(s) final",
            err=True,
        )
        with live.read() as conn:
            through = live.finalized_through(conn, lock=False) if windows == "final" else None
        with live.read() as live_conn, into.read() as into_conn:  # streamed: neither store held whole
            diffs = merge_differences(window_totals(live_conn, through), window_totals(into_conn, through))
        horizon = _wall_ms() - cfg.settings.park_horizon_ms
        mine, theirs = live.stats(horizon), into.stats(horizon)
        for name in ("parked_bytes", "quarantined_bytes", "dead_letters"):
            click.echo(f"{name.replace('_', ' ')}: live {mine[name]}, rebuilt {theirs[name]}", err=True)
    finally:
        into.close()
        live.close()
    scope = "every window" if through is None else "windows final in the live store"
    click.echo(f"{len(diffs)} difference(s) by account, usage type and window ({scope}):")
    sys.stdout.write(render(diffs, limit))
    if check and diffs:
        sys.exit(1)
