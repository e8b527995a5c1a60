"""`kvmeter dead-letters list|show|retry`: what the collector could not use, and re-driving it.

The store comes from --db or the config's [store] url; a retry applies the letter with the
config's settings (a collector.toml or an all-in-one's allinone.toml), so a cause fixed in the
config (a raised [lifecycle] max_event_bytes, ...) is what the retry runs under.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from kvmeter.collector import config as config_mod
from kvmeter.collector.cli import MAX_ID, ROW_ID, _open_config_store, invalid_config
from kvmeter.collector.redrive import FAILED, Redriver, letter_dict, retried_dict
from kvmeter.collector.store import LETTER_STATES, Store, StoredLetter
from kvmeter.collector.text_table import printable, text_table

_FORMATS = click.Choice(["table", "json"])


def _config(path: str | None) -> config_mod.CollectorConfig:
    if path is None:
        return config_mod.CollectorConfig()
    try:
        doc = config_mod.read_toml(Path(path))
        if _all_in_one(doc):  # an all-in-one's file: its collector part
            from kvmeter.pipeline import allinone

            return allinone.from_dict(doc, path, base=Path(path).parent).collector
        return config_mod.from_dict(doc, path, base=Path(path).parent)
    except config_mod.ConfigError as exc:
        raise invalid_config(path, exc.problems) from None


def _all_in_one(doc: dict[str, object]) -> bool:
    """An all-in-one's file: any of its own sections (every one optional, [agent] too) or
    [lifecycle] events_file; else a collector's."""
    from kvmeter.pipeline.allinone import AGENT_SECTIONS

    lifecycle = doc.get("lifecycle")
    events_file = isinstance(lifecycle, dict) and "events_file" in lifecycle
    return bool(doc.keys() & set(AGENT_SECTIONS)) or events_file


def _store(db_url: str | None, cfg: config_mod.CollectorConfig) -> Store:
    """A retry adjusts final windows like the consumer: with [handoff] its items go to the outbox."""
    return _open_config_store(cfg, db_url)[0]


_db = click.option("--db", "db_url", default=None, help="Store URL (default: the config's [store] url).")
_cfg = click.option("--config", "config_path", default=None, help="collector.toml or allinone.toml.")
_fmt = click.option("--format", "fmt", type=_FORMATS, default="table", show_default=True)


@click.group("dead-letters")
def dead_letters() -> None:
    """Inputs the collector could not use: list, show and re-drive them."""


@dead_letters.command("list")
@_db
@_cfg
@click.option("--state", type=click.Choice(LETTER_STATES), default="open", show_default=True)
@click.option("--source", type=click.Choice(["lifecycle", "measures"]), default=None)
@click.option("--after", "after_id", type=click.IntRange(0, MAX_ID), default=0, help="Only ids above this.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@_fmt
def list_letters(
    db_url: str | None,
    config_path: str | None,
    state: str,
    source: str | None,
    after_id: int,
    limit: int,
    fmt: str,
) -> None:
    """Dead letters, oldest first (without their bytes: `show` has them)."""
    store = _store(db_url, _config(config_path))
    try:
        letters = store.dead_letters(state=state, source=source, after_id=after_id, limit=limit)
    finally:
        store.close()
    if fmt == "json":
        click.echo(json.dumps([letter_dict(letter) for letter in letters], indent=2))
        return
    rows = [
        (
            str(x.id),
            x.state,
            x.source,
            x.reason,
            str(x.size),
            letter_dict(x)["created"],
            str(x.retries),
            x.origin,
        )
        for x in letters
    ]
    click.echo(text_table(("id", "state", "source", "reason", "bytes", "created", "retries", "origin"), rows))


@dead_letters.command("show")
@click.argument("letter_id", type=ROW_ID)
@_db
@_cfg
@_fmt
def show(letter_id: int, db_url: str | None, config_path: str | None, fmt: str) -> None:
    """One dead letter with its bytes."""
    store = _store(db_url, _config(config_path))
    try:
        letter = store.dead_letter_by_id(letter_id)
    finally:
        store.close()
    if letter is None:
        raise click.ClickException(f"no dead letter {letter_id}")
    doc = letter_dict(letter, with_raw=True)
    if fmt == "json":
        click.echo(json.dumps(doc, indent=2))
        return
    for name in ("id", "state", "source", "origin", "reason", "message", "size", "created", "retries",
                 "retried", "resolved", "key"):  # fmt: skip
        click.echo(f"{name:>9}: {'' if doc[name] is None else printable(str(doc[name]))}")
    click.echo("      raw:")
    sys.stdout.write(_shown_bytes(letter))


@dead_letters.command("retry")
@click.argument("letter_ids", type=ROW_ID, nargs=-1, required=True)
@_db
@_cfg
@_fmt
def retry(letter_ids: tuple[int, ...], db_url: str | None, config_path: str | None, fmt: str) -> None:
    """Apply dead letters again through the live path, under the config's settings. A letter
    that succeeds is marked resolved; one that fails again stays, with its new reason. Exits 1
    when a letter is missing or still fails."""
    cfg = _config(config_path)
    store = _store(db_url, cfg)
    results = []
    try:
        redriver = Redriver(store, cfg.settings)
        for letter_id in letter_ids:
            done = redriver.retry(letter_id)
            results.append((letter_id, done))
    finally:
        store.close()
    if fmt == "json":
        docs = [{"id": i, "result": "not_found"} if d is None else retried_dict(d) for i, d in results]
        click.echo(json.dumps(docs, indent=2))
    else:
        rows = [
            (str(i), "not_found", "", "")
            if d is None
            else (str(i), d.result, d.letter.reason if d.result == FAILED else "", d.letter.message[:80])
            for i, d in results
        ]
        click.echo(text_table(("id", "result", "reason", "message"), rows))
    if any(d is None or d.result == FAILED for _, d in results):
        sys.exit(1)


def _shown_bytes(letter: StoredLetter, limit: int = 4096) -> str:
    """The bytes as text when they are UTF-8, else as hex; the first `limit` of them."""
    more = f"\n... (the first {limit} of {letter.size} bytes)\n" if letter.size > limit else "\n"
    try:
        return printable(letter.raw.decode("utf-8")[:limit], lines=True) + more
    except UnicodeDecodeError:
        return letter.raw[:limit].hex(" ", 2) + more
