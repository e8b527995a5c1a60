"""`kvmeter reconcile [--dry-run]` and `kvmeter corrections` as commands, against the CloudStack
API double and a SQLite store."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from kvmeter.collector.model import Record, Settings
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store
from tests.collector_support import ACCT_A, HOUR, VM1, usage_event
from tests.harness import cloudstack_api as api


def kvmeter(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvmeter", *args], capture_output=True, text=True, timeout=120
    )


def test_dry_run_then_a_pass_then_the_list(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/usage.db"
    start = (int(time.time() * 1000) // HOUR - 1) * HOUR
    store = Store(db)
    store.migrate()
    Collector(store, Settings(), lambda: start + HOUR).apply_events(
        [
            Record(v, k)
            for k, v in (
                usage_event("VM.CREATE", VM1, ACCT_A, start),
                usage_event("VM.START", VM1, ACCT_A, start),
            )
        ]
    )
    store.close()
    with api.CloudStackApiDouble() as double:
        double.cloud["listAccounts"] = [api.account(ACCT_A, "alice")]
        double.cloud["listVirtualMachines"] = [api.vm(VM1, "web-1", "alice", "Stopped", "small", start)]
        config = tmp_path / "collector.toml"
        config.write_text(
            f'[store]\nurl = "{db}"\n[cloudstack]\nendpoint = "{double.endpoint}"\n'
            f'api_key = "{api.API_KEY}"\nsecret_key = "{api.SECRET}"\n'
        )
        first = kvmeter("reconcile", "--config", str(config))
        assert first.returncode == 0, first.stderr
        assert "awaiting a second witness" in first.stdout
        dry = kvmeter("reconcile", "--dry-run", "--config", str(config))
        assert dry.returncode == 0, dry.stderr
        assert "VM.STOP" in dry.stdout
        assert "would be made" in dry.stderr
        listed = kvmeter("corrections", "--db", db, "--format", "json")
        assert "VM.STOP" not in listed.stdout  # the dry run changed nothing
        applied = kvmeter("reconcile", "--config", str(config))
        assert "VM.STOP" in applied.stdout, applied.stderr
        again = kvmeter("reconcile", "--dry-run", "--config", str(config))
        assert "VM.STOP" not in again.stdout
        double.down = True
        down = kvmeter("reconcile", "--dry-run", "--config", str(config))
        assert down.returncode != 0
        assert "no pass" in down.stderr
    rows = json.loads(kvmeter("corrections", "--db", db, "--format", "json").stdout)
    stops = [r for r in rows if r["event_type"] == "VM.STOP"]
    assert [(r["resource"], r["account"], r["source"]) for r in stops] == [(VM1, ACCT_A, "cloudstack-api")]
    table = kvmeter("corrections", "--db", db, "--account", ACCT_A)
    assert "VM.STOP" in table.stdout
    assert "stop event lost" in table.stdout
