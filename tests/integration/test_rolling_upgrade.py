"""A rolling upgrade on one PostgreSQL store: once a newer replica migrated the schema past this
code's, an older replica still running stops writing at its next write or tick (checked at most
every schema_check_s, not per record), says why (StoreTooNew, /health's `failing`), acknowledges
nothing it did not commit (redelivered to the new code), and the loop stops instead of retrying."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from kvmeter.collector.feed import Feeder
from kvmeter.collector.metrics import Metrics
from kvmeter.collector.model import Settings
from kvmeter.collector.schema import collector_state, schema_version, stream_marks, usage_records
from kvmeter.collector.service import Collector
from kvmeter.collector.store import MIGRATIONS, Store, StoreTooNew
from tests.collector_support import HOUR, T0, Clock, scenario
from tests.harness.ports import free_port, wait_for_port
from tests.integration.test_feed import ListInput, records

pytestmark = pytest.mark.pg
NOW = T0 + 5 * HOUR
NEWER = max(v for v, _ in MIGRATIONS) + 1


@pytest.fixture
def stores(pg_database: str) -> Iterator[tuple[Store, Store]]:
    """The older replica's store (re-reading the schema version at every write) and the newer
    replica's, on one database."""
    old, new = Store(pg_database), Store(pg_database)
    old.migrate()
    old.schema_check_s = 0  # at its next write (the default: at most every 2 s)
    new.migrate()
    yield old, new
    old.close()
    new.close()


def upgrade(new: Store) -> None:
    """The newer replica's migration: the store is at a schema this code does not know."""
    with new.write() as conn:
        conn.execute(sa.insert(schema_version).values(version=NEWER, applied_ms=1))


def counts(store: Store) -> tuple[int, int, str]:
    with store.read() as conn:
        marks = conn.execute(sa.select(sa.func.count()).select_from(stream_marks)).scalar_one()
        rows = conn.execute(sa.select(sa.func.count()).select_from(usage_records)).scalar_one()
        state = conn.execute(sa.select(collector_state)).fetchall()
    return marks, rows, repr(sorted(state))


def test_an_older_replica_stops_writing_once_a_newer_one_migrated(stores: tuple[Store, Store]) -> None:
    """After a newer replica migrated the store, the older replica's next delivery is refused
    with StoreTooNew naming both versions: nothing of it lands (no stream mark, no usage), it is
    not acknowledged (Kafka redelivers it to the new code), /health's `failing` says why, and
    the loop raises instead of retrying forever. Before the fix it was applied and acknowledged
    by code that does not know the schema."""
    old, new = stores
    sc = scenario()
    log: list[str] = []
    events = records([v for _, v in sc.events], "events")
    source = ListInput("kafka", [events], [records(sc.batches, "m")], log)
    feeder = Feeder(
        Collector(old, Settings(), Clock(NOW)), [source], Metrics(), tick_seconds=3600, poll_timeout=0
    )
    feeder.step(measures=False)  # the lifecycle, under the old schema: applied and acknowledged
    assert f"kafka ack lifecycle {len(events)}" in log
    upgrade(new)
    before = counts(new)
    with pytest.raises(StoreTooNew, match=rf"schema version {NEWER}, newer than this kvmeter's {NEWER - 1}"):
        feeder.step()
    assert not [line for line in log if "ack measures" in line]
    assert counts(new) == before
    assert feeder.failing == "measures: StoreTooNew"


def test_a_statement_the_newer_schema_refuses_is_not_dead_lettered(stores: tuple[Store, Store]) -> None:
    """A newer schema may refuse the old code's statements before its next periodic check (here
    a NOT NULL column the old inserts leave out): the write's failure re-reads the version, so
    the refusal is StoreTooNew (nothing acknowledged) rather than every record dead-lettered as
    `unstorable` and acknowledged, as before the fix."""
    old, new = stores
    old.schema_check_s = 3600.0  # no periodic re-read due: only the failure makes it look
    sc = scenario()
    log: list[str] = []
    events = records([v for _, v in sc.events], "events")
    source = ListInput("kafka", [events], [records(sc.batches, "m")], log)
    feeder = Feeder(
        Collector(old, Settings(), Clock(NOW)), [source], Metrics(), tick_seconds=3600, poll_timeout=0
    )
    feeder.step(measures=False)
    with new.write() as conn:  # the newer release's migration
        conn.exec_driver_sql("ALTER TABLE stream_marks ADD COLUMN epoch bigint NOT NULL")
        conn.execute(sa.insert(schema_version).values(version=NEWER, applied_ms=1))
    before = counts(new)
    with pytest.raises(StoreTooNew):
        feeder.step()
    assert not [line for line in log if "ack measures" in line]
    assert new.dead_letter_rows() == []
    assert counts(new) == before


def test_an_idle_older_replica_is_stopped_by_its_tick(stores: tuple[Store, Store]) -> None:
    """A replica with nothing to apply notices at its tick: the tick is refused (StoreTooNew)
    and finalizes nothing, and every later write is refused without asking the store again."""
    old, new = stores
    collector = Collector(old, Settings(), Clock(NOW))
    upgrade(new)
    before = counts(new)
    with pytest.raises(StoreTooNew):
        collector.tick()
    assert counts(new) == before
    old.schema_check_s = 3600.0  # remembered: refused at once, no re-read needed
    with pytest.raises(StoreTooNew), old.write() as conn:
        conn.execute(sa.delete(usage_records))
    assert counts(new) == before


def test_the_older_collector_command_exits_nonzero_saying_why(pg_database: str, tmp_path: Path) -> None:
    """The real `kvmeter collector`, running when a newer replica migrates the store, exits 1
    within a few seconds (its tick re-reads the schema version at most every 2 s) with one line
    naming both versions, so systemd restarts it and the start refuses (StoreTooNew). Before the
    fix it kept running and writing."""
    port = free_port()
    config = tmp_path / "collector.toml"
    config.write_text(
        f'''[store]\nurl = "{pg_database}"\n[webhook]\nsecret_key = "k"\n[usage]\ntick_seconds = 0.2\n
[api]\nlisten = "127.0.0.1:{port}"\ntoken = "webhook-api-token-0123"\n'''
    )
    log = tmp_path / "collector.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvmeter", "collector", "--config", str(config)],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for_port("127.0.0.1", port, 30, "the collector's API")
        new = Store(pg_database)
        upgrade(new)
        new.close()
        try:
            code = proc.wait(8)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 1, log.read_text()
        assert f"stopped: the store is at schema version {NEWER}, newer than" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
