"""`kvmeter credits add|list|reverse`: money added to accounts, the balances' other half.

The store comes from --db or the config's [store] url. A credit is in the tariff's currency
when the config names a tariff, else in --currency; an account's first is refused in another
currency than the store's credits' (the collector's tariff's: the file may name another, one
the collector refused); an account's credits share one.
With --idempotency-key the credit is added once (credit_keys): run again, it shows the credit
added before; with another amount, currency or note it is refused, as POST /v1/credits is.
`reverse` takes a credit out (credit_keys.reverse_once): an account holding credits in two
currencies has no balance until those of one are reversed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import click
from sqlalchemy.engine import Connection

from kvmeter.collector.api_credits import credit_dict
from kvmeter.collector.cli_dead_letters import _cfg, _config, _db, _fmt, _store
from kvmeter.collector.credit_keys import (
    CurrencyHeld,
    KeyReused,
    NotReversible,
    add_once,
    idempotency_key,
    reverse_once,
)
from kvmeter.collector.money_input import MAX_NOTE, credit_amount, currency_code
from kvmeter.collector.store import Store
from kvmeter.collector.store import credits as stored
from kvmeter.collector.text_table import text_table


@click.group("credits")
def credits() -> None:
    """Credits added to accounts (balance = credits - costs)."""


@credits.command("add")
@_db
@_cfg
@click.option("--account", required=True, help="The account's uuid.")
@click.option("--amount", required=True, help='A positive decimal, e.g. "25.00".')
@click.option("--currency", default=None, help="The credit's currency (default: the config's tariff's).")
@click.option("--note", default="", help="Why (kept with the credit).")
@click.option(
    "--idempotency-key",
    "key",
    default=None,
    help="The credit's id in your records (e.g. the payment's): run again, adds nothing more.",
)
@_fmt
def add(
    db_url: str | None,
    config_path: str | None,
    account: str,
    amount: str,
    currency: str | None,
    note: str,
    key: str | None,
    fmt: str,
) -> None:
    """Add a credit to an account."""
    cfg = _config(config_path)
    tariff = getattr(cfg, "tariff", None)
    try:
        value = credit_amount(amount)
        given = None if currency is None else currency_code(currency)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if tariff is not None and given is not None and given != tariff.currency:
        raise click.BadParameter(
            f"{given} is not the tariff's currency ({tariff.currency})", param_hint="--currency"
        )
    chosen = given or (tariff.currency if tariff is not None else None)
    if chosen is None:
        raise click.UsageError("--currency is needed: the config names no tariff to take it from")
    if not account or not account.isprintable() or len(account) > 64:
        raise click.BadParameter("the account's uuid", param_hint="--account")
    if len(note) > MAX_NOTE or not note.isprintable():  # as POST /v1/credits: the column's size
        raise click.BadParameter(f"at most {MAX_NOTE} printable characters", param_hint="--note")
    try:
        key = None if key is None else idempotency_key(key)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--idempotency-key") from None
    now = int(time.time() * 1000)
    row, replayed = _written(
        _store(db_url, cfg),
        # unguarded: the file's tariff is not the one in force (the collector refuses one in
        # another currency than the credits'; a first credit in it would fit no tariff)
        lambda conn: add_once(conn, account, value, chosen, note, "cli", now, key, unguarded=True),
    )
    _show(row, fmt, f" (added before with idempotency key {key})" if replayed else "")


@credits.command("reverse")
@_db
@_cfg
@click.option("--credit", "credit_id", required=True, type=click.IntRange(min=1), help="The credit's id.")
@click.option("--note", default="", help='Why (default: "reverses credit <id>").')
@_fmt
def reverse(db_url: str | None, config_path: str | None, credit_id: int, note: str, fmt: str) -> None:
    """Take a credit out: add the opposite amount in its currency to its account (once)."""
    note = note or f"reverses credit {credit_id}"
    if len(note) > MAX_NOTE or not note.isprintable():
        raise click.BadParameter(f"at most {MAX_NOTE} printable characters", param_hint="--note")
    now = int(time.time() * 1000)
    row, replayed = _written(
        _store(db_url, _config(config_path)), lambda conn: reverse_once(conn, credit_id, note, "cli", now)
    )
    _show(row, fmt, " (reversed before)" if replayed else "")


def _written(
    store: Store, write: Callable[[Connection], tuple[dict[str, Any], bool]]
) -> tuple[dict[str, Any], bool]:
    """`write` in one transaction of `store` (then closed); a credit refused is a clear error."""
    try:
        with store.write() as conn:
            return write(conn)
    except (CurrencyHeld, KeyReused, NotReversible) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        store.close()


def _show(row: dict[str, Any], fmt: str, again: str) -> None:
    if fmt == "json":
        click.echo(json.dumps(credit_dict(row), indent=2))
    else:
        click.echo(f"credit {row['id']}: {row['amount']} {row['currency']} to {row['account']}{again}")


_PAGE = 10_000


@credits.command("list")
@_db
@_cfg
@click.option("--account", default=None, help="Only this account's.")
@_fmt
def list_credits(db_url: str | None, config_path: str | None, account: str | None, fmt: str) -> None:
    """Credits, oldest first."""
    store = _store(db_url, _config(config_path))
    try:
        accounts = None if account is None else frozenset({account})
        rows: list[dict[str, Any]] = []
        with store.read() as conn:  # every one, a page at a time (never cut at a page's size)
            while page := stored.list_credits(
                conn, accounts, _PAGE, after_id=rows[-1]["id"] if rows else None
            ):
                rows += page
    finally:
        store.close()
    docs = [credit_dict(r) for r in rows]
    if fmt == "json":
        click.echo(json.dumps(docs, indent=2))
        return
    columns = ("account", "amount", "currency", "created", "created_by", "note")
    table = [(str(d["id"]), *(str(d[c]) for c in columns)) for d in docs]
    click.echo(text_table(("id", *columns), table))
