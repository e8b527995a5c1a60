"""`make demo`'s command, shortened: the simulated cloud is metered and every VM's billed bytes
match its own kernel counters; the usage table names both accounts, with their costs."""

from __future__ import annotations

import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.libvirt]


def test_demo_meters_its_cloud_exactly(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvmeter",
            "demo",
            "--seconds",
            "15",
            "--linger",
            "0",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "bob: VM.STOP" in text
    assert "alice: NET.IPRELEASE" in text
    usage = {(m[1], m[2]) for m in re.finditer(r"^\s+(alice|bob)\s+(\d) \w+", text, re.M)}
    assert {("alice", "1"), ("alice", "4"), ("bob", "1"), ("bob", "3"), ("bob", "4")} <= usage
    truth = re.findall(
        r"^\s+([ir]-\d+(?:-\d+)?-VM)\s+(sent|received)\s+(\d+)\s+(\d+)\s+([+-]\d+)$", text, re.M
    )
    assert len(truth) == 6, text
    for vm, direction, kernel, billed, diff in truth:
        assert int(kernel) > 0, (vm, direction)
        assert (int(billed), diff) == (int(kernel), "+0"), (vm, direction)
    assert "API (running): http://" in text
    # Costs next to usage, under the demo's tariff (every usage type priced: no unpriced note).
    totals = dict(re.findall(r"^\s+(alice|bob)\s+TOTAL this month\s+(\d+\.\d{6})\s+projected", text, re.M))
    assert set(totals) == {"alice", "bob"}, text
    assert all(Decimal(cost) > 0 for cost in totals.values())
    assert "unpriced" not in text
    costs = re.findall(r"^\s+(alice|bob)\s+(\d) \w+\s+[\d.]+ (?:hours|bytes)\s+(\d+\.\d{6})$", text, re.M)
    for account, total in totals.items():
        assert sum(Decimal(c) for a, _, c in costs if a == account) == Decimal(total)
    # The running all-in-one ([billing] tariff_file in its config) answers the same on /v1/costs.
    served = dict(
        re.findall(r"(alice|bob) (\d+\.\d{6})", text.split("/v1/costs of the running pipeline (EUR):")[1])
    )
    assert set(served) == set(totals)
    for account, total in totals.items():  # asked a moment later: a tick may have added seconds of VM time
        assert Decimal(0) <= Decimal(served[account]) - Decimal(total) < Decimal("0.001"), (served, totals)
