"""Collector throughput from the broker to committed usage, next to the pure decode rate of the
same batches in the same run; and the scale model (N agents x M NICs, one and two replicas).

The batches are produced to a Tansu broker first (a backlog), then collector replicas
(bench.collector_worker: kvmeter's loop over its Kafka input) drain it into SQLite or PostgreSQL. Throughput
= measures / (last chunk committed - first chunk started) over all replicas. The result is
checked: the store's stream marks must reach every batch and its billed bytes (types 4 and 5)
must equal the bytes produced, or the run fails.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import batches
from bench.timing import timed

REPO = Path(__file__).resolve().parent.parent


def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    from confluent_kafka import Producer

    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 20,
            "compression.type": "lz4",  # what kvmeter's publisher uses
        }
    )
    errors: list[Any] = []
    for key, value in records:
        while True:
            try:
                producer.produce(topic, key=key, value=value, on_delivery=lambda e, m: e and errors.append(e))
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    if producer.flush(120) != 0 or errors:
        raise RuntimeError(f"producing to {topic} failed: {errors[:3]} ({len(errors)} errors)")


def decode_rate(values: list[bytes], measures: int, passes: int = 3) -> dict[str, float]:
    """Measures per CPU second of kvmeter.collector.decode.decode_batch over `values` (median)."""
    from kvmeter.collector.decode import decode_batch

    def run() -> None:
        for value in values:
            decode_batch(value)

    rates = sorted(measures / timed(run)[0] for _ in range(passes))
    return {"measures_per_s": rates[len(rates) // 2], "passes": passes}


def _store_totals(db: str) -> dict[str, int]:
    """Billed bytes (usage types 4 and 5) and the parked / quarantined / dead-lettered rest."""
    from kvmeter.collector.store import Store

    store = Store(db)
    try:
        billed = sum(q for key, q in store.net_usage().items() if key.usage_type in (4, 5))
        return {"billed_bytes": billed, **store.stats(0)}
    finally:
        store.close()


def _worker(
    db: str, bootstrap: str, group: str, measures: str, lifecycle: str, *extra: str
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.collector_worker",
            "--db",
            db,
            "--bootstrap",
            bootstrap,
            "--group",
            group,
            "--measures-topic",
            measures,
            "--lifecycle-topic",
            lifecycle,
            *extra,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def preload_lifecycle(db: str, bootstrap: str, lifecycle_topic: str, expect_events: int) -> float:
    """Apply the whole lifecycle topic to the store first (not timed), so that no measure of the
    timed drain is parked for want of an owner. Returns the seconds it took."""
    from kvmeter.collector.store import Store

    Store(db).migrate()  # once, before replicas race to create the schema
    t0 = time.monotonic()
    proc = _worker(
        db, bootstrap, f"bench-pre-{uuid.uuid4().hex[:8]}", "unused", lifecycle_topic,
        "--preload-events", str(expect_events),
    )  # fmt: skip
    out, err = proc.communicate(timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"lifecycle preload failed ({proc.returncode}): {err[-3000:]}")
    got = json.loads(out)["events"]
    if got != expect_events:
        raise RuntimeError(f"lifecycle preload applied {got} events, {expect_events} were produced")
    return time.monotonic() - t0


def drain(
    db: str,
    bootstrap: str,
    play: dict[str, Any],
    *,
    replicas: int,
    timeout: float,
    log: Callable[[str], None],
    preload: bool = True,
) -> dict[str, Any]:
    """Run `replicas` collector processes in one group until every stream of `play` is applied
    (after applying its lifecycle first, unless `preload` is False: the store has it already)."""
    measures_topic, lifecycle_topic = play["measures_topic"], play["lifecycle_topic"]
    expect_marks, expect_bytes, expect_measures = play["marks"], play["bytes"], play["measures"]
    expect_events = play["events"]
    before = _store_totals(db) if not preload else None
    preload_s = preload_lifecycle(db, bootstrap, lifecycle_topic, expect_events) if preload else 0.0
    group = f"bench-{uuid.uuid4().hex[:8]}"
    ready_dir = Path(tempfile.mkdtemp(prefix="kvmeter-bench-ready-"))
    procs = [
        _worker(
            db,
            bootstrap,
            group,
            measures_topic,
            lifecycle_topic,
            "--ready",
            str(ready_dir / f"replica-{r}"),
            "--expect-events",
            str(expect_events),
        )
        for r in range(replicas)
    ]
    try:
        deadline = time.monotonic() + timeout
        while True:  # every replica in the group with its partitions and the lifecycle read
            held = [
                int(f.read_text() or 0) for f in ready_dir.glob("replica-*") if not f.name.endswith(".tmp")
            ]
            if len(held) == replicas and all(held) and sum(held) == play["partitions"]:
                break
            dead = [p for p in procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                err = (
                    dead[0].stderr.read() if dead and dead[0].stderr else f"timeout, partitions held: {held}"
                )
                raise RuntimeError(f"collector replicas did not get ready: {err[-3000:]}")
            time.sleep(0.05)
        t0 = time.monotonic()
        produce(bootstrap, measures_topic, play["records"])
        produce_s = time.monotonic() - t0
        while True:
            marks = _marks(db)
            if all(marks.get(s, 0) >= seq for s, seq in expect_marks.items()):
                break
            dead = [p for p in procs if p.poll() is not None]
            if dead:
                err = dead[0].stderr.read() if dead[0].stderr else ""
                raise RuntimeError(f"a collector replica exited early: {err[-3000:]}")
            if time.monotonic() > deadline:
                done = sum(1 for s, seq in expect_marks.items() if marks.get(s, 0) >= seq)
                raise RuntimeError(
                    f"collector did not finish in {timeout:.0f} s ({done}/{len(expect_marks)} streams)"
                )
            time.sleep(0.25)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        outputs = []
        for p in procs:
            try:
                out, err = p.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
            outputs.append((p.returncode, out, err))
        shutil.rmtree(ready_dir, ignore_errors=True)
    workers = []
    for code, out, err in outputs:
        if code != 0 or not out.strip():
            raise RuntimeError(f"collector replica failed ({code}): {err[-3000:]}")
        workers.append(json.loads(out))
    totals = _store_totals(db)
    if before is not None:  # a store shared with an earlier run: count this run's part
        totals = {k: v - before.get(k, 0) for k, v in totals.items()}
    kept = totals["billed_bytes"] + totals["parked_bytes"] + totals["quarantined_bytes"]
    if kept != expect_bytes:  # conservation: every byte produced is billed, parked or quarantined
        raise RuntimeError(f"store holds {kept} bytes ({totals}), {expect_bytes} were produced")
    applied = sum(w["measures"] for w in workers)
    if applied != expect_measures:
        raise RuntimeError(f"replicas applied {applied} measures, {expect_measures} were produced")
    first = min(w["first_apply_wall"] for w in workers if w["first_apply_wall"] is not None)
    last = max(w["last_commit_wall"] for w in workers if w["last_commit_wall"] is not None)
    seconds = last - first
    busy_cpu = sum(w["busy_cpu_s"] or 0.0 for w in workers)
    log(f"collector: {replicas} replica(s) drained {applied} measures in {seconds:.2f} s")
    return {
        "replicas": replicas,
        "measures": applied,
        "seconds": seconds,
        "measures_per_s": applied / seconds,
        "measures_per_cpu_s": applied / busy_cpu if busy_cpu else None,
        "parked": sum(w["parked"] for w in workers),
        "duplicates": sum(w["duplicates"] for w in workers),
        "store_totals": totals,
        "lifecycle_preload_s": preload_s,
        "produce_s": produce_s,
        "per_replica": workers,
    }


def _marks(db: str) -> dict[str, int]:
    from kvmeter.collector.store import Store

    store = Store(db)
    try:
        return store.marks()
    finally:
        store.close()


def _topics(bootstrap: str, prefix: str, partitions: int) -> tuple[str, str]:
    from tests.harness.kafka import create_topic

    tag = uuid.uuid4().hex[:8]
    measures, lifecycle = f"{prefix}-measures-{tag}", f"{prefix}-lifecycle-{tag}"
    create_topic(bootstrap, measures, partitions)
    create_topic(bootstrap, lifecycle, 1)
    return measures, lifecycle


def _play(
    bootstrap: str,
    fleet: list[batches.Host],
    polls: int,
    interval_ms: int,
    prefix: str,
    partitions: int,
    *,
    start_ms: int | None = None,
    lifecycle_topic: str | None = None,
) -> dict[str, Any]:
    """Produce `polls` polls of the fleet's measures to a fresh topic, and its lifecycle (VM.START
    usage events, 5 hours before now) to a fresh topic unless `lifecycle_topic` already has it."""
    now = time.time_ns() // 1_000_000
    start = start_ms if start_ms is not None else now - polls * interval_ms
    records, measures, total = batches.poll_batches(fleet, polls, interval_ms, start_ms=start)
    measures_topic, new_lifecycle = _topics(bootstrap, prefix, partitions)
    events = batches.lifecycle_events(fleet, now - 5 * 3_600_000, create=False)
    if lifecycle_topic is None:
        lifecycle_topic = new_lifecycle
        produce(bootstrap, lifecycle_topic, events)
    return {
        "records": records,
        "partitions": partitions,
        "measures_topic": measures_topic,
        "lifecycle_topic": lifecycle_topic,
        "values": [v for _, v in records],
        "measures": measures,
        "bytes": total,
        "events": len(events),
        "marks": {h.stream_id: polls for h in fleet},
    }


def throughput(
    bootstrap: str,
    pg_admin: str | None,
    *,
    hosts: int,
    nics: int,
    polls: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Section 2: one replica, SQLite and PostgreSQL (unless pg_admin is None), next to the decode
    rate of the same batches."""
    from tests.harness.postgres import create_database

    fleet = batches.make_fleet(hosts, nics)
    play = _play(bootstrap, fleet, polls, 10_000, "tp", 2)
    n_batches, n_measures, n_events = len(play["values"]), play["measures"], play["events"]
    log(f"collector: {n_batches} batches, {n_measures} measures, {n_events} events produced")
    decode_before = decode_rate(play["values"], play["measures"])
    runs = {}
    with tempfile.TemporaryDirectory(prefix="kvmeter-bench-") as tmp:
        stores = [("sqlite", f"sqlite:///{tmp}/usage.db")]
        if pg_admin is not None:
            stores.append(("postgresql", create_database(pg_admin)))
        for name, db in stores:
            # Each store drains the same batches from a topic of its own: reusing one would hand
            # the second store every batch twice (the first run's copy, then its own).
            own = {**play, "measures_topic": _topics(bootstrap, "tp", play["partitions"])[0]}
            runs[name] = drain(db, bootstrap, own, replicas=1, timeout=600, log=log)
    decode_after = decode_rate(play["values"], play["measures"])
    decode = (decode_before["measures_per_s"] + decode_after["measures_per_s"]) / 2
    for run in runs.values():
        run["ratio_to_decode"] = run["measures_per_s"] / decode
    return {
        "hosts": hosts,
        "nics_per_host": nics,
        "polls": polls,
        "batches": len(play["values"]),
        "measures": play["measures"],
        "lifecycle_events": play["events"],
        "decode_measures_per_s": decode,
        "decode_runs": [decode_before["measures_per_s"], decode_after["measures_per_s"]],
        "stores": runs,
    }


def scale_model(
    bootstrap: str,
    pg_admin: str,
    *,
    hosts: int,
    nics: int,
    polls: int,
    target_hosts: int,
    target_nics: int,
    interval_s: float,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Section 4: `hosts` agents x `nics` NICs played into the broker as a backlog of `polls` poll
    intervals, drained by one and then by two replicas into one PostgreSQL database; headroom =
    throughput / the rate `target_hosts` x `target_nics` every `interval_s` needs.

    The lifecycle is applied once (not timed); each replica count gets its own streams in its own
    past hour window (both still open), so both runs insert fresh usage rows."""
    from tests.harness.postgres import create_database

    required = target_hosts * target_nics * 2 / interval_s  # a measure per direction per NIC per poll
    hour = 3_600_000
    this_hour = time.time_ns() // 1_000_000 // hour * hour
    db = create_database(pg_admin)
    runs = {}
    lifecycle_topic = None
    for replicas in (1, 2):
        fleet = batches.make_fleet(hosts, nics, seed=replicas)  # same VMs, new streams
        window_start = this_hour - (3 - replicas) * hour
        play = _play(
            bootstrap, fleet, polls, int(interval_s * 1000), "scale", 2,
            start_ms=window_start + 60_000, lifecycle_topic=lifecycle_topic,
        )  # fmt: skip
        log(f"scale: {len(play['values'])} batches of {nics * 2} measures produced for {replicas} replica(s)")
        run = drain(
            db, bootstrap, play, replicas=replicas, timeout=900, log=log, preload=lifecycle_topic is None
        )
        lifecycle_topic = play["lifecycle_topic"]
        run["headroom"] = run["measures_per_s"] / required
        runs[str(replicas)] = run
    return {
        "played_hosts": hosts,
        "nics_per_host": nics,
        "polls": polls,
        "target_hosts": target_hosts,
        "target_nics_per_host": target_nics,
        "interval_s": interval_s,
        "required_measures_per_s": required,
        "store": "postgresql",
        "replicas": runs,
    }
