"""Lifecycle load: CloudStack event-bus lines into committed usage, next to the rate at which the
same lines are merely parsed, in the same run.

The load is `kvmeter ingest --events` (Collector.apply_events per chunk of 500 lines: the live
consumer's code path) into a fresh SQLite file and a fresh PostgreSQL database. Each VM gets
VM.CREATE, VM.START, the caller's VM.START action event, an IP address (NET.IPASSIGN), VM.STOP
an hour later and VM.START again an hour after that, so every event writes hourly RUNNING_VM,
ALLOCATED_VM and IP_ADDRESS records up to now. The result is checked: every line stored, none
dead-lettered, and both stores hold the same usage.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.timing import timed

HOUR_MS = 3_600_000


def write_events(path: Path, vms: int, now_ms: int) -> int:
    """The event lines of `vms` VMs (six each, the first ones 6 hours before now); returns the
    number of lines."""
    from kvmeter.pipeline.sim.simevents import EventBus

    bus = EventBus()
    t0 = (now_ms // HOUR_MS - 6) * HOUR_MS
    lines = []
    for i in range(vms):
        vm, ip = str(uuid.UUID(int=(1 << 100) + i)), str(uuid.UUID(int=(2 << 100) + i))
        account, at = str(uuid.UUID(int=(3 << 100) + i % 50)), t0 + i * 1000 % HOUR_MS
        records = [
            bus.vm("VM.CREATE", vm, account, at, "small"),
            bus.vm("VM.START", vm, account, at + 1000, "small"),
            bus.action("VM.START", "VirtualMachine", vm, "admin-caller", at + 1000),
            bus.ip("NET.IPASSIGN", ip, account, at + 2000, f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"),
            bus.vm("VM.STOP", vm, account, at + HOUR_MS, "small"),
            bus.vm("VM.START", vm, account, at + 2 * HOUR_MS, "small"),
        ]
        lines.extend(value.decode() for _, value in records)
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


def parse_rate(path: Path, passes: int = 3) -> float:
    """Lines per CPU second of cloudstack.parse_event alone (median of `passes`)."""
    from kvmeter.collector.cloudstack import parse_event

    values = [line for line in path.read_bytes().splitlines() if line]

    def run() -> None:
        for value in values:
            parse_event(value)

    return statistics.median(len(values) / timed(run)[0] for _ in range(passes))


def load(db: str, path: Path, lines: int, now_ms: int) -> dict[str, Any]:
    """Ingest the event file into an empty store; events per wall and CPU second."""
    from kvmeter.collector.ingest import ingest_events
    from kvmeter.collector.model import Settings
    from kvmeter.collector.service import Collector
    from kvmeter.collector.store import Store

    store = Store(db)
    try:
        store.migrate()
        collector = Collector(store, Settings(), clock=lambda: now_ms)
        cpu, wall, out = timed(lambda: ingest_events(collector, path))
        if out.events != lines or out.dead_letters:
            raise RuntimeError(f"stored {out.events} of {lines} events, {len(out.dead_letters)} dead letters")
        usage = store.net_usage()
    finally:
        store.close()
    return {
        "events": out.events,
        "records": len(usage),
        "seconds": wall,
        "events_per_s": lines / wall,
        "events_per_cpu_s": lines / cpu,
        "usage": usage,
    }


def run(pg_admin: str | None, *, vms: int, log: Callable[[str], None]) -> dict[str, Any]:
    from tests.harness.postgres import create_database

    now_ms = time.time_ns() // 1_000_000
    with tempfile.TemporaryDirectory(prefix="kvmeter-bench-lifecycle-") as tmp:
        path = Path(tmp) / "events.jsonl"
        lines = write_events(path, vms, now_ms)
        log(f"lifecycle: {lines} events of {vms} VMs")
        parse_before = parse_rate(path)
        stores = [("sqlite", f"sqlite:///{tmp}/usage.db")]
        if pg_admin is not None:
            stores.append(("postgresql", create_database(pg_admin)))
        runs = {name: load(db, path, lines, now_ms) for name, db in stores}
        parse = (parse_before + parse_rate(path)) / 2
    reference = runs["sqlite"].pop("usage")
    for name, result in runs.items():
        if name != "sqlite" and result.pop("usage") != reference:
            raise RuntimeError(f"{name} holds other usage than sqlite for the same events")
        result["ratio_to_parse"] = result["events_per_s"] / parse
        log(f"lifecycle: {name} {result['events_per_s']:,.0f} events/s")
    return {"vms": vms, "events": lines, "parse_events_per_s": parse, "stores": runs}
