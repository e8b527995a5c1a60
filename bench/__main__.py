"""`python -m bench [--quick] [--only SECTION,...] [--out ...]`; sections: agent, process,
collector, freshness, scale, lifecycle, memory, retention, api, billing,
peers, migration24, claim.

Runs as root from the repository root (network namespaces). Each section that fails is recorded
with its error and the run goes on; the exit status is 1 if any section failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import report

SECTIONS = (
    "agent",
    "process",
    "collector",
    "freshness",
    "scale",
    "lifecycle",
    "memory",
    "retention",
    "api",
    "billing",
    "peers",
    "migration24",
    "claim",
)
REPO = Path(__file__).resolve().parent.parent


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _commit() -> str:
    if os.environ.get("KVMETER_BENCH_COMMIT"):  # bench/at_commit.sh runs an exported tree
        return os.environ["KVMETER_BENCH_COMMIT"]
    result = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO, check=False
    )
    return result.stdout.strip() or "unknown"


def _section(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    _log(f"{name}: start")
    t0 = time.monotonic()
    try:
        out = fn()
    except Exception as exc:
        traceback.print_exc()
        out = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    out["section_seconds"] = time.monotonic() - t0
    _log(f"{name}: done in {out['section_seconds']:.0f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every section")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections to run")
    ap.add_argument("--out", default=str(REPO / "bench" / "results.json"))
    ap.add_argument("--sizes", default=None, help="agent interface counts, e.g. 200,2000,10000")
    args = ap.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if os.geteuid() != 0:
        ap.error("run as root: the agent and freshness sections build network namespaces")
    quick = args.quick
    sizes = (
        [int(s) for s in args.sizes.split(",")]
        if args.sizes
        else ([20, 100] if quick else [200, 2000, 10000])
    )

    results: dict[str, Any] = {
        "meta": {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "commit": _commit(),
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "quick": quick,
            "loadavg_start": os.getloadavg()[0],
            "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        }
    }
    if "agent" in only:
        from bench import agent_bench

        results["agent"] = _section("agent", lambda: agent_bench.run(sizes, quick=quick, log=_log))

    if "process" in only:
        from bench import agent_process

        results["process"] = _section("process", lambda: agent_process.run(sizes, quick=quick, log=_log))

    needs_broker = {"collector", "scale"} & set(only)
    if needs_broker:
        from tests.harness.kafka import Broker
        from tests.harness.postgres import Cluster

        from bench import collector_bench

        broker = Broker().start()
        pg = Cluster().start()
        try:
            if "collector" in only:
                hosts, nics, polls = (10, 20, 2) if quick else (100, 100, 10)
                results["collector"] = _section(
                    "collector",
                    lambda: collector_bench.throughput(
                        broker.bootstrap, pg.dsn, hosts=hosts, nics=nics, polls=polls, log=_log
                    ),
                )
            if "scale" in only:
                hosts, polls = (10, 1) if quick else (250, 4)
                results["scale"] = _section(
                    "scale",
                    lambda: collector_bench.scale_model(
                        broker.bootstrap,
                        pg.dsn,
                        hosts=hosts,
                        nics=100,
                        polls=polls,
                        target_hosts=10_000,
                        target_nics=100,
                        interval_s=60.0,
                        log=_log,
                    ),
                )
        finally:
            broker.stop()
            pg.stop()
    if "freshness" in only:
        from bench import freshness

        results["freshness"] = _section("freshness", lambda: freshness.run(quick=quick, log=_log))

    if "lifecycle" in only:
        from tests.harness.postgres import Cluster

        from bench import lifecycle_bench

        pg = Cluster().start()
        try:
            vms = 200 if quick else 2000
            results["lifecycle"] = _section(
                "lifecycle", lambda: lifecycle_bench.run(pg.dsn, vms=vms, log=_log)
            )
        finally:
            pg.stop()

    if "memory" in only:
        from bench import memory_bench

        vms = 300 if quick else 20_000
        results["memory"] = _section("memory", lambda: memory_bench.run(vms=vms, log=_log))

    if "retention" in only:
        from tests.harness.postgres import Cluster

        from bench import retention_bench

        pg = Cluster().start()
        try:
            vms, quarantined = (300, 6000) if quick else (20_000, 200_000)
            results["retention"] = _section(
                "retention",
                lambda: retention_bench.run(pg.dsn, vms=vms, quarantined=quarantined, log=_log),
            )
        finally:
            pg.stop()

    if "api" in only:
        from tests.harness.postgres import Cluster

        from bench import api_bench

        pg = Cluster().start()
        try:
            records = 20_000 if quick else 1_000_000
            results["api"] = _section("api", lambda: api_bench.run(pg.dsn, records=records, log=_log))
        finally:
            pg.stop()

    if {"migration24", "claim"} & set(only):
        from tests.harness.postgres import Cluster

        from bench import store_scale_bench

        pg = Cluster().start()
        try:
            if "migration24" in only:
                events = [20_000] if quick else [200_000, 1_000_000]
                results["migration24"] = _section(
                    "migration24", lambda: store_scale_bench.migration24(pg.dsn, events, log=_log)
                )
            if "claim" in only:
                depths = [1000] if quick else [1000, 10_000, 100_000]
                results["claim"] = _section(
                    "claim",
                    lambda: store_scale_bench.claim(
                        pg.dsn, depths, limit=200, rounds=5 if quick else 15, log=_log
                    ),
                )
        finally:
            pg.stop()

    if "billing" in only:
        from bench import billing_bench

        results["billing"] = _section("billing", lambda: billing_bench.run(quick=quick, log=_log))

    if "peers" in only:
        from bench import peers

        results["peers"] = _section("peers", lambda: peers.run(sizes, quick=quick, log=_log))

    results["meta"]["loadavg_end"] = os.getloadavg()[0]
    Path(args.out).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(report.render(results), end="")
    print(f"results: {args.out}")
    failed = [name for name in SECTIONS if "error" in results.get(name, {})]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
