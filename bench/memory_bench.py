"""A replica's memory after a year of lifecycle: closed resources, owner hints and the agents'
witness leaving memory, against a replica that keeps every one (the baseline, same input, same run).

Each VM of the year is created at a random time, gets an IP address, is stopped and started
again on some days, and is destroyed after a random lifetime (mean MEAN_LIFE_DAYS, so a small
part of the year's VMs exist at any one time); its IP is released then. Every day the agents send
one measure of each VM running at 23:00, with their inventory (the VM's <metadata> owner and its
state): owner hints and witness of every VM the cloud ever had. A simulated day at a time, the
clock at the day's end: the events through Collector.apply_events, the day's batches through
apply_batches, then tick() (the live collector's calls), into a fresh SQLite store. Each variant
runs in its own process so its memory is its own: RSS at the end and at its peak, what is held in
memory (resources, hints, witness) sampled every day, and the time spent in apply_batches (the
hot path's cost of looking for what left memory: `batch_rate_ratio`, evicting / keeping).

    python -m bench.memory_bench --vms 2000          # both variants, prints JSON
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
YEAR_DAYS = 365
MEAN_LIFE_DAYS = 10
T0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z
REPO = Path(__file__).resolve().parent.parent


def year_of_events(vms: int, seed: int = 1) -> list[tuple[int, bytes, bytes]]:
    """(time, key, value) of the year's events in time order."""
    return year_of(vms, seed)[0]


Life = tuple[int, int, int, list[tuple[int, int]]]  # (number, born, dies, its stopped spans)


def year_of(vms: int, seed: int = 1) -> tuple[list[tuple[int, bytes, bytes]], list[Life]]:
    """The year's events (time, key, value) in time order, and each VM's life."""
    from kvmeter.pipeline.sim.simevents import EventBus

    bus, rng, out, lives = EventBus(), random.Random(seed), [], []
    for i in range(vms):
        vm, ip = str(uuid.UUID(int=(1 << 100) + i)), str(uuid.UUID(int=(2 << 100) + i))
        account = str(uuid.UUID(int=(3 << 100) + i % 500))
        born = T0 + rng.randrange(YEAR_DAYS * DAY_MS)
        dies = born + int(rng.expovariate(1 / MEAN_LIFE_DAYS) * DAY_MS) + HOUR_MS
        at = [born, born + 1000, born + 2000]
        records = [
            bus.vm("VM.CREATE", vm, account, at[0], "small"),
            bus.vm("VM.START", vm, account, at[1], "small"),
            bus.ip("NET.IPASSIGN", ip, account, at[2], f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"),
        ]
        day, stopped = born + DAY_MS, [(dies - HOUR_MS, dies)]
        while day < dies - 2 * HOUR_MS:
            if rng.random() < 0.2:  # stopped for an hour on a fifth of its days
                records += [
                    bus.vm("VM.STOP", vm, account, day, ""),
                    bus.vm("VM.START", vm, account, day + HOUR_MS, ""),
                ]
                at += [day, day + HOUR_MS]
                stopped.append((day, day + HOUR_MS))
            day += DAY_MS
        records += [
            bus.vm("VM.STOP", vm, account, dies - HOUR_MS, ""),
            bus.vm("VM.DESTROY", vm, account, dies, ""),
            bus.ip("NET.IPRELEASE", ip, account, dies, f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"),
        ]
        at += [dies - HOUR_MS, dies, dies]
        out += [(t, key, value) for t, (key, value) in zip(at, records, strict=True)]
        lives.append((i, born, dies, stopped))
    out.sort(key=lambda item: item[0])
    return [item for item in out if item[0] < T0 + YEAR_DAYS * DAY_MS], lives


def day_batch(day: int, alive: list[int], seq: int) -> bytes:
    """The agents' batch of a day: one measure of each VM running, with its inventory."""
    from kvmeter.proto import pb

    end = T0 + (day + 1) * DAY_MS
    b = pb.MeasureBatch(
        schema=2, host_id="kvm-1", boot_id="boot-1", stream_id="bench", seq=seq, poll_time=end
    )
    for i in alive:
        vm, account = str(uuid.UUID(int=(1 << 100) + i)), str(uuid.UUID(int=(3 << 100) + i % 500))
        b.measures.add(
            header=2, saddr=0, bytes=1000 + i, start=end - HOUR_MS, end=end - HOUR_MS + 60_000,
            direction=pb.VM_TX, traffic_type=pb.PUBLIC, instance_uuid=vm, domain_name=f"i-{i % 500}-{i}-VM",
        )  # fmt: skip
        dom = b.inventory.add(uuid=vm, name=f"i-{i % 500}-{i}-VM", state=pb.RUNNING)
        dom.owner.update({"ownerAccountUuid": account})
    return b.SerializeToString()


def _rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def replay(db: str, vms: int, *, evict: bool) -> dict[str, Any]:
    """The year into a fresh store, a day at a time; memory and what is held at the end."""
    from kvmeter.collector.model import Record, Settings
    from kvmeter.collector.service import Collector
    from kvmeter.collector.store import Store

    events, lives = year_of(vms)
    store = Store(db)
    store.migrate()
    clock = [T0]
    # Daily windows: the memory is the point here, not the hourly records' write volume.
    settings = Settings(window_ms=DAY_MS, evict_after_ms=DAY_MS if evict else None)
    collector = Collector(store, settings, lambda: clock[0])
    rss_start, i = _rss_mb(), 0
    most = {"resources": 0, "hints": 0, "witness": 0}
    batch_s, measures = 0.0, 0
    for day in range(YEAR_DAYS):
        end = T0 + (day + 1) * DAY_MS
        chunk = []
        while i < len(events) and events[i][0] < end:
            chunk.append(Record(events[i][2], events[i][1], "bench"))
            i += 1
        clock[0] = end
        for start in range(0, len(chunk), 500):
            out = collector.apply_events(chunk[start : start + 500])
            if out.dead_letters:
                raise RuntimeError(f"{len(out.dead_letters)} dead letters: {out.dead_letters[0].message}")
        at = end - HOUR_MS  # the measure's minute: a stopped VM sends nothing
        alive = [
            n
            for n, born, dies, stopped in lives
            if born < at and at + 60_000 < dies and not any(s <= at + 60_000 and at < e for s, e in stopped)
        ]
        if alive:
            value = day_batch(day, alive, day + 1)
            began = time.perf_counter()
            out = collector.apply_batches([Record(value, None, "bench")])
            batch_s += time.perf_counter() - began
            measures += out.measures
            if out.parked or out.dead_letters:
                raise RuntimeError(f"day {day}: {out.parked} parked, {len(out.dead_letters)} dead letters")
        collector.tick()
        for name, held in (
            ("resources", collector.resident),
            ("hints", len(collector.hints)),
            ("witness", len(collector.witness)),
        ):
            most[name] = max(most[name], held)
    result = {
        "events": len(events),
        "resources_held": collector.resident,
        "resources_held_most": most["resources"],
        "hints_held": len(collector.hints),
        "hints_held_most": most["hints"],
        "witness_held": len(collector.witness),
        "witness_held_most": most["witness"],
        "measures": measures,
        "batch_measures_per_s": measures / batch_s if batch_s else float("nan"),
        "events_held": sum(len(evs) for evs in collector.events.values()),
        "resources_evicted": len(collector.evicted),
        "rss_start_mb": rss_start,
        "rss_end_mb": _rss_mb(),
        # VmHWM, this address space's peak: ru_maxrss keeps the forking parent's across exec.
        "rss_peak_mb": _rss_mb("VmHWM"),
        "usage": {repr(k): v for k, v in store.net_usage().items()},
        "witness": _witness_rows(store),
    }
    store.close()
    return result


def _witness_rows(store: Any) -> list[tuple[str, bool, int]]:
    from kvmeter.collector.store import reconciliation

    with store.read() as conn:
        return sorted((d, w.running, w.since_ms) for d, w in reconciliation.load_witness(conn).items())


def _variant(vms: int, tmp: str, *, evict: bool) -> dict[str, Any]:
    name = "evict" if evict else "keep"
    cmd = [sys.executable, "-m", "bench.memory_bench", "--worker", name, "--vms", str(vms), "--db"]
    cmd.append(f"sqlite:///{tmp}/{name}.db")
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{name} run failed: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def run(*, vms: int, log: Callable[[str], None]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kvmeter-bench-memory-") as tmp:
        keep = _variant(vms, tmp, evict=False)
        log(f"memory: keep-all {keep['rss_end_mb']:.0f} MB, {keep['resources_held']} resources held")
        evict = _variant(vms, tmp, evict=True)
        log(f"memory: evicting {evict['rss_end_mb']:.0f} MB, {evict['resources_held']} resources held")
    if keep.pop("usage") != evict.pop("usage"):
        raise RuntimeError("eviction changed the usage records")
    if keep.pop("witness") != evict.pop("witness"):
        raise RuntimeError("eviction changed the stored witness")
    grown = {name: r["rss_end_mb"] - r["rss_start_mb"] for name, r in (("keep", keep), ("evict", evict))}
    return {
        "vms": vms,
        "days": YEAR_DAYS,
        "events": keep["events"],
        "keep": keep,
        "evict": evict,
        "held_ratio": evict["resources_held"] / max(keep["resources_held"], 1),
        "hints_held_ratio": evict["hints_held_most"] / max(keep["hints_held"], 1),
        "witness_held_ratio": evict["witness_held_most"] / max(keep["witness_held"], 1),
        "batch_rate_ratio": evict["batch_measures_per_s"] / keep["batch_measures_per_s"],
        "rss_growth_ratio": grown["evict"] / grown["keep"] if grown["keep"] > 0 else float("nan"),
        "rss_ratio": evict["rss_end_mb"] / keep["rss_end_mb"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.memory_bench")
    ap.add_argument("--vms", type=int, default=2000)
    ap.add_argument("--worker", choices=("keep", "evict"), help="run one variant in this process")
    ap.add_argument("--db", help="the worker's store URL")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(replay(args.db, args.vms, evict=args.worker == "evict")))
        return 0
    print(json.dumps(run(vms=args.vms, log=lambda m: print(m, file=sys.stderr)), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
