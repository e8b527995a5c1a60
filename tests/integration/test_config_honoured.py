"""Settings honoured as documented, through the loaders the commands use: `kvmeter dead-letters
retry` and `kvmeter ingest` under a config with [handoff] hand off what they adjust or
finalize; the all-in-one's SIGHUP takes the tariff file its config names now; the hand-off's
producer stays idempotent with acks=all whatever kafka_options say; [api] token and token_file
exclude each other; the sample collector.toml shows the defaults."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from kvmeter.collector.model import DeadLetter, Record, Settings
from kvmeter.collector.redrive import RESOLVED, Redriver
from kvmeter.collector.schema import handoff_outbox, usage_adjustments, usage_records
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store
from tests.collector_support import ACCT_A, HOUR, T0, VM1, Clock, M, Stream, usage_event

ROOT = Path(__file__).resolve().parents[2]
NOW = T0 + 5 * HOUR  # T0's window is final (grace 2 h) once the collector ticks


def _store_with_a_late_batch_dead_lettered(db: Path) -> tuple[int, int]:
    """A live collector with [handoff] (outbox on): VM1 started at T0, a batch of T0's window
    applied and the window finalized (its record item in the outbox); an earlier batch of the
    same stream, for the same (now final) window, sits in the dead letters. Returns (letter id,
    outbox rows so far)."""
    store = Store(f"sqlite:///{db}", outbox=True)
    store.migrate()
    live = Collector(store, Settings(), Clock(NOW))
    live.apply_events(
        [
            Record(v, k)
            for k, v in (usage_event("VM.CREATE", VM1, ACCT_A, T0), usage_event("VM.START", VM1, ACCT_A, T0))
        ]
    )
    stream = Stream("stream-h1", "h1")
    first = stream.batch([M(T0 + 60_000, T0 + 120_000, 700)])
    second = stream.batch([M(T0, T0 + 60_000, 50)])
    assert live.apply_batches([Record(second)]).batches == 1
    live.tick()
    with store.write() as conn:
        store.dead_letter(conn, [DeadLetter("measures", "kvmeter.measures/0@41", first, "unknown", "?")], NOW)
    (letter,) = store.dead_letters(state="all")
    with store.read() as conn:
        before = conn.execute(sa.select(sa.func.count()).select_from(handoff_outbox)).scalar_one()
    store.close()
    assert before > 0  # the finalized records were handed to the outbox
    return letter.id, before


def _outbox_adjustments(db: Path) -> tuple[int, int]:
    """(adjustments stored, adjustment items in the hand-off outbox)."""
    store = Store(f"sqlite:///{db}")
    try:
        with store.read() as conn:
            adjustments = conn.execute(sa.select(sa.func.count()).select_from(usage_adjustments)).scalar_one()
            items = [json.loads(r[0]) for r in conn.execute(sa.select(handoff_outbox.c.item))]
    finally:
        store.close()
    return adjustments, sum(1 for i in items if i["kind"] == "adjustment")


def test_control_redriven_letter_on_a_handoff_store_puts_its_adjustment_in_the_outbox(tmp_path: Path) -> None:
    """What [handoff] promises: an adjustment of a final window is a billable item in the outbox
    (the Redriver on a store opened as the collector opens it, outbox=True)."""
    db = tmp_path / "usage.db"
    letter_id, _ = _store_with_a_late_batch_dead_lettered(db)
    store = Store(f"sqlite:///{db}", outbox=True)
    try:
        done = Redriver(store, Settings()).retry(letter_id)
        assert done is not None
        assert done.result == RESOLVED
    finally:
        store.close()
    assert _outbox_adjustments(db) == (1, 1)


def test_dead_letters_retry_with_handoff_config_hands_off_its_adjustment(tmp_path: Path) -> None:
    """`kvmeter dead-letters retry ID --config collector.toml`, the config having a [handoff]
    section: README says a redriven letter's change to a final window is the record's next
    version, and that with [handoff] every adjustment is written to the outbox in the transaction
    that makes it: the command opens the store as `kvmeter collector` does."""
    db = tmp_path / "usage.db"
    letter_id, _ = _store_with_a_late_batch_dead_lettered(db)
    cfg = tmp_path / "collector.toml"
    cfg.write_text(
        f'[store]\nurl = "sqlite:///{db}"\n\n[handoff]\nwebhook_url = "http://127.0.0.1:9/items"\n'
    )
    from kvmeter.collector.cli_dead_letters import dead_letters

    result = CliRunner().invoke(dead_letters, ["retry", str(letter_id), "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    adjustments, handed_off = _outbox_adjustments(db)
    assert adjustments == 1  # the late bytes did adjust the final window
    assert handed_off == 1, "the adjustment was made but never written to the [handoff] outbox"


def test_ingest_with_a_handoff_config_hands_off_what_it_finalizes_and_refuses_without_it(
    tmp_path: Path,
) -> None:
    """`kvmeter ingest --config collector.toml` opens the store as `kvmeter collector` does: with
    [handoff], the windows it makes final are items in the outbox (they were made final and never
    handed off, billed to no one). On a store that hands off, ingest without that config is
    refused, the store left as it was."""
    from tests.integration.test_ingest import write_inputs

    events, measures = write_inputs(tmp_path, json_measures=True, bad=False)
    db = tmp_path / "usage.db"
    cfg = tmp_path / "collector.toml"
    cfg.write_text(
        f'[store]\nurl = "sqlite:///{db}"\n\n[handoff]\nwebhook_url = "http://127.0.0.1:9/items"\n'
    )
    run = [
        sys.executable,
        "-m",
        "kvmeter",
        "ingest",
        "--db",
        f"sqlite:///{db}",
        "--now",
        "2024-05-14T14:00:00Z",
    ]
    done = subprocess.run(
        [*run, "--config", str(cfg), "--events", str(events), "--measures", str(measures)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    store = Store(f"sqlite:///{db}")
    try:
        with store.read() as conn:
            items = conn.execute(sa.select(sa.func.count()).select_from(handoff_outbox)).scalar_one()
            records = conn.execute(sa.select(sa.func.count()).select_from(usage_records)).scalar_one()
    finally:
        store.close()
    assert items > 0, "ingest made windows final and handed none of them off"
    refused = subprocess.run(
        [*run, "--events", str(events)], capture_output=True, text=True, timeout=120, check=False
    )
    assert refused.returncode == 1, refused.stderr
    assert "--config" in refused.stderr, refused.stderr
    assert "[handoff]" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    store = Store(f"sqlite:///{db}")
    try:
        with store.read() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(handoff_outbox)).scalar_one() == items
            assert conn.execute(sa.select(sa.func.count()).select_from(usage_records)).scalar_one() == records
    finally:
        store.close()


# -- the all-in-one's SIGHUP reload of [billing] tariff_file ---------------------------------------

_TARIFF_EXAMPLE = Path(ROOT, "packaging/config/tariff.toml.example")


def _tariffs(tmp_path: Path) -> tuple[Path, Path]:
    eur = tmp_path / "tariff-eur.toml"
    usd = tmp_path / "tariff-usd.toml"
    text = _TARIFF_EXAMPLE.read_text()
    eur.write_text(text)
    usd.write_text(text.replace('currency = "EUR"', 'currency = "USD"'))
    return eur, usd


def _allinone_toml(path: Path, tariff: Path) -> None:
    path.write_text(
        '[agent]\nstate_dir = "state"\nhost_id = "h1"\n\n'
        f'[store]\nurl = "sqlite:///{path.parent / "usage.db"}"\n\n'
        f'[billing]\ntariff_file = "{tariff.name}"\n'
    )


def _reload_named(reloads, name: str):  # type: ignore[no-untyped-def]
    return dict(reloads._items)[name]


def test_control_collector_sighup_takes_a_newly_named_tariff_file(tmp_path: Path) -> None:
    """The collector: SIGHUP reads [billing] tariff_file again from the config (reloading.tariff),
    so a config now naming another file puts that file in force."""
    from kvmeter.collector.billing.tariff_file import TariffSource
    from kvmeter.collector.billing.tariff_file import load as load_tariff
    from kvmeter.collector.reloading import tariff as tariff_reload

    eur, usd = _tariffs(tmp_path)
    cfg = tmp_path / "collector.toml"
    cfg.write_text(f'[kafka]\nbootstrap = "127.0.0.1:9092"\n[billing]\ntariff_file = "{eur.name}"\n')
    source = TariffSource(load_tariff(eur, {"public"}), eur, {"public"})
    cfg.write_text(f'[kafka]\nbootstrap = "127.0.0.1:9092"\n[billing]\ntariff_file = "{usd.name}"\n')
    tariff_reload(cfg, source)()
    assert source.current.currency == "USD"


def test_allinone_sighup_takes_a_newly_named_tariff_file(tmp_path: Path) -> None:
    """README (Reload on SIGHUP): "the tariff: the file [billing] tariff_file names (the all-in-one
    reads it again too)"; the all-in-one "does all three on SIGHUP, from its one config file": a
    tariff_file named anew there is put in force, as the collector does."""
    from types import SimpleNamespace

    from kvmeter.collector.billing.tariff_file import TariffSource
    from kvmeter.pipeline import allinone

    eur, usd = _tariffs(tmp_path)
    cfg_path = tmp_path / "allinone.toml"
    _allinone_toml(cfg_path, eur)
    cfg = allinone.load(cfg_path)  # the real loader: [billing] accepted, EUR tariff loaded
    assert cfg.collector.tariff is not None
    assert cfg.collector.tariff.currency == "EUR"
    source = TariffSource(cfg.collector.tariff, cfg.collector.tariff_file, cfg.collector.settings.billable)
    pipeline = SimpleNamespace(metrics=None, agent=None, collector=None, credentials=None, tariffs=source)
    reloads = allinone.reloads(str(cfg_path), pipeline)  # type: ignore[arg-type]

    _allinone_toml(cfg_path, usd)  # the operator names another tariff file, then SIGHUP
    assert allinone.load(cfg_path).collector.tariff.currency == "USD"  # the config as it is now
    _reload_named(reloads, "tariff")()
    assert source.current.currency == "USD", f"tariff in force still from {source.path}"


# -- [handoff] kafka_options can turn off the documented idempotent acks=all producer ------------


def test_handoff_kafka_producer_stays_idempotent_acks_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README (Hand-off): the relay hands items to a Kafka topic "(an idempotent producer,
    `acks=all`)", and an item is marked sent only on "the broker's delivery report". The agent
    forces those two properties over [kafka.properties] (FORCED_PROPERTIES); the hand-off's
    KafkaSink spreads `kafka_options` last, so `acks = "0"` (accepted by the schema) makes
    librdkafka report delivery without any broker acknowledgement and rows are marked sent."""
    import confluent_kafka

    from kvmeter.collector import config as config_mod
    from kvmeter.collector.outbox_sinks import KafkaSink

    cfg_path = tmp_path / "collector.toml"
    cfg_path.write_text(
        '[kafka]\nbootstrap = "127.0.0.1:9092"\n\n'
        '[handoff]\ntopic = "kvmeter.billable"\n'
        'kafka_options = { "acks" = "0", "enable.idempotence" = false }\n'
    )
    cfg = config_mod.load(cfg_path)  # accepted
    assert cfg.handoff is not None
    seen: dict[str, object] = {}

    class FakeProducer:
        def __init__(self, conf: dict[str, object]) -> None:
            seen.update(conf)

    monkeypatch.setattr(confluent_kafka, "Producer", FakeProducer)
    KafkaSink(cfg.handoff, lambda _m: None)
    assert (seen["acks"], seen["enable.idempotence"]) == ("all", True), seen


# -- [api] token and token_file both given: the inline token is dropped without a word ------------


def test_api_token_and_token_file_exclude_each_other(tmp_path: Path) -> None:
    """[api] `token` (or `token_file`): both given, the file's token would silently replace the
    one written in the config; refused, as every other secret / secret_file pair is."""
    from kvmeter.collector import config as config_mod
    from kvmeter.tomlconfig import ConfigError

    (tmp_path / "api.token").write_text("file-token-0123456789\n")
    cfg_path = tmp_path / "collector.toml"
    cfg_path.write_text(
        '[kafka]\nbootstrap = "127.0.0.1:9092"\n\n'
        '[api]\ntoken = "inline-token-0123456789"\ntoken_file = "api.token"\n'
    )
    with pytest.raises(ConfigError, match="token and token_file exclude each other"):
        config_mod.load(cfg_path)


# -- collector.toml.example: "the values shown are the defaults" ---------------------------------


def test_collector_example_shows_only_defaults() -> None:
    """packaging/config/collector.toml.example: "Every key is optional but one input ...; the values
    shown are the defaults". Loaded through the collector's own loader, every value it sets equals
    what an empty config gives, but for a key whose line says it has no default
    (`[kafka] bootstrap`: without it, no Kafka input)."""
    import dataclasses
    import tomllib

    from kvmeter.collector import config as config_mod

    text = Path(ROOT, "packaging/config/collector.toml.example").read_text()
    example = tomllib.loads(text)
    # a key whose line says it has no default is not claimed as one (the proposed doc fix)
    for line in text.splitlines():
        if "no default" in line and "=" in line and not line.lstrip().startswith("#"):
            key = line.split("=", 1)[0].strip()
            for section in example.values():
                if isinstance(section, dict):
                    section.pop(key, None)
    shown, default = config_mod.from_dict(example), config_mod.from_dict({})
    differs = {
        f.name: (getattr(default, f.name), getattr(shown, f.name))
        for f in dataclasses.fields(default)
        if getattr(default, f.name) != getattr(shown, f.name)
    }
    assert differs == {}, differs


@pytest.mark.parametrize("command", [["collector"], ["run", "--all-in-one"]])
def test_a_webhook_url_with_a_password_is_refused_without_showing_it(
    tmp_path: Path, command: list[str]
) -> None:
    """urllib sends no user or password from a URL, and the URL is logged at start and shown in
    /health: `[handoff] webhook_url` and `[balances] webhook_url` with one are refused, and the
    refusal never quotes it."""
    from kvmeter.cli import main

    config = tmp_path / "kvmeter.toml"
    config.write_text(
        f'[store]\nurl = "sqlite:///{tmp_path}/usage.db"\n'
        '[kafka]\nbootstrap = "127.0.0.1:1"\n'
        '[handoff]\nwebhook_url = "https://billing:hunter2-secret@billing.example.com/items"\n'
        '[balances]\nthreshold = "5.00"\nwebhook_url = "https://ops:hunter2-secret@ops.example.com/alerts"\n'
    )
    result = CliRunner().invoke(main, [*command, "--config", str(config)])
    assert result.exit_code != 0, result.output
    assert "handoff.webhook_url" in result.output
    assert "balances.webhook_url" in result.output
    assert "hunter2" not in result.output
