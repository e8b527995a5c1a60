"""The lifecycle-load benchmark runs end to end on a tiny size (so `make bench` does not rot):
both stores, its own checks (every event stored, the same usage in both stores), the report."""

from __future__ import annotations

import pytest
from bench import lifecycle_bench, report

pytestmark = [pytest.mark.pg]


def test_lifecycle_bench_runs_on_a_tiny_size(pg_dsn: str) -> None:
    life = lifecycle_bench.run(pg_dsn, vms=3, log=lambda _: None)
    assert life["events"] == 3 * 6
    for name in ("sqlite", "postgresql"):
        run = life["stores"][name]
        assert run["events"] == 18
        # per VM: RUNNING_VM and ALLOCATED_VM hours since the start, IP_ADDRESS hours: 6 windows back
        assert run["records"] >= 3 * 3 * 5
        assert run["events_per_s"] > 0
    meta = {
        "quick": True,
        "started": "now",
        "cpus": 2,
        "commit": "x",
        "loadavg_start": 0.0,
        "loadavg_end": 0.0,
    }
    text = report.render({"meta": meta, "lifecycle": life})
    assert "ingest --events -> committed usage, postgresql" in text
