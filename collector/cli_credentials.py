"""`kvmeter credentials create|list|revoke`: the API's credentials kept in the collector's store.

The store is the one of a collector or all-in-one config (its [store] url) or --db. A running
API sees a new or revoked credential from its next request on.
"""

from __future__ import annotations

import json
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from kvmeter.collector import config as config_mod
from kvmeter.collector import report
from kvmeter.collector.cli import ROW_ID, _open_store
from kvmeter.collector.credentials import scoped
from kvmeter.collector.store import Store
from kvmeter.collector.store.credentials import CLOUDSTACK, KINDS, MintedCredentials, StoredCredential

DEFAULT_CONFIG = "/etc/kvmeter/collector.toml"


def _store(config_path: str, db_url: str | None) -> Store:
    if db_url is None:
        try:
            doc = config_mod.read_toml(Path(config_path))  # collector.toml or allinone.toml: [store]
        except config_mod.ConfigError as exc:
            raise click.ClickException(str(exc)) from None
        store_section = doc.get("store", {})
        db_url = store_section.get("url") if isinstance(store_section, dict) else None
        db_url = db_url or config_mod.CollectorConfig.db_url
    return _open_store(db_url)


def _when(ms: int | None) -> str:
    return "" if ms is None else report.iso(ms)


def _as_dict(cred: StoredCredential) -> dict[str, object]:
    grant = cred.grant
    return {
        "id": cred.id,
        "name": cred.name,
        "kind": cred.kind,
        "key": cred.key,
        "accounts": None if grant.accounts is None else sorted(grant.accounts),
        "domains": sorted(grant.domains),
        "created": _when(cred.created_ms),
        "revoked": _when(cred.revoked_ms) or None,
    }


F = TypeVar("F", bound=Callable[..., Any])


def _with_store(func: F) -> F:
    func = click.option("--db", "db_url", default=None, help="Store URL instead of the config's.")(func)
    return click.option(
        "--config",
        "config_path",
        default=DEFAULT_CONFIG,
        show_default=True,
        help="Collector or all-in-one TOML; its [store] url is used.",
    )(func)


@click.group()
def credentials() -> None:
    """Mint, list and revoke the API's credentials (kept in the collector's store)."""


@credentials.command()
@_with_store
@click.option("--name", required=True, help="Who holds it (a tenant, a billing system); shown in listings.")
@click.option("--account", "accounts", multiple=True, help="Account uuid it may read (repeatable).")
@click.option("--domain", "domains", multiple=True, help="CloudStack domain uuid: its accounts (repeatable).")
@click.option("--operator", is_flag=True, help="Operator-wide: every account's usage.")
@click.option(
    "--kind",
    type=click.Choice(KINDS),
    default=CLOUDSTACK,
    show_default=True,
    help="A CloudStack key pair (signed requests) or a bearer token.",
)
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
def create(
    config_path: str,
    db_url: str | None,
    name: str,
    accounts: tuple[str, ...],
    domains: tuple[str, ...],
    operator: bool,  # noqa: FBT001 - click passes flags by position
    kind: str,
    fmt: str,
) -> None:
    """Mint a key pair or token; its secret is shown now and never again."""
    if operator == bool(accounts or domains):
        raise click.UsageError("give --account and/or --domain for a tenant, or --operator (not both)")
    if not name.strip() or len(name) > 128:
        raise click.BadParameter("1 to 128 characters", param_hint="--name")
    store = _store(config_path, db_url)
    try:
        grant = scoped(name, accounts, domains)
        cred, secrets = MintedCredentials(store).create(kind, name, grant, _now_ms())
        if kind == CLOUDSTACK:
            _warn_if_readable(store)
    finally:
        store.close()
    if fmt == "json":
        click.echo(json.dumps({**_as_dict(cred), **secrets}, indent=2))
        return
    click.echo(f"credential {cred.id} for {name}: {cred.grant.describe()}")
    for label, value in secrets.items():
        click.echo(f"{label.replace('_', ' ')}: {value}")
    click.echo("Keep the secret now: it is not shown again (revoke and create another if lost).", err=True)


@credentials.command("list")
@_with_store
@click.option("--revoked", is_flag=True, help="Revoked ones too.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def list_(config_path: str, db_url: str | None, revoked: bool, fmt: str) -> None:  # noqa: FBT001
    """The credentials in the store (never their secrets)."""
    store = _store(config_path, db_url)
    try:
        rows = MintedCredentials(store).listing(revoked=revoked)
    finally:
        store.close()
    if fmt == "json":
        click.echo(json.dumps([_as_dict(c) for c in rows], indent=2))
        return
    click.echo(f"{'id':>4}  {'name':<20} {'kind':<10} {'created':<20} {'revoked':<20} key / scope")
    for c in rows:
        click.echo(
            f"{c.id:>4}  {c.name[:20]:<20} {c.kind:<10} {_when(c.created_ms):<20} {_when(c.revoked_ms):<20} "
            f"{c.key}\n{'':>78}{c.grant.describe()}"
        )


@credentials.command()
@_with_store
@click.argument("credential_id", type=ROW_ID)
def revoke(config_path: str, db_url: str | None, credential_id: int) -> None:
    """Revoke credential ID (see `list`): refused from the API's next request on."""
    store = _store(config_path, db_url)
    try:
        done = MintedCredentials(store).revoke(credential_id, _now_ms())
    finally:
        store.close()
    if done is None:
        raise click.ClickException(f"no credential {credential_id} in force")
    click.echo(f"credential {done.id} ({done.name}) revoked")


def _warn_if_readable(store: Store) -> None:
    """CloudStack secret keys are kept as they are (an HMAC is verified with the key itself):
    say so when any user may read a SQLite store's file."""
    path = store.engine.url.database
    if store.engine.url.get_backend_name() != "sqlite" or not path or not Path(path).exists():
        return
    mode = Path(path).stat().st_mode
    if mode & stat.S_IRWXO:  # the packages' store is 0640 in the collector's own group
        click.echo(
            f"warning: {path} (mode {stat.S_IMODE(mode):04o}) holds CloudStack secret keys and others "
            "may read it: chmod o-rwx it (the collector's user must keep access)",
            err=True,
        )


def _now_ms() -> int:
    return int(time.time() * 1000)
