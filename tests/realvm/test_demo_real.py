"""`kvmeter demo --real-vms`, shortened: the demo's cloud on real QEMU guests under a real
libvirtd; every VM's billed bytes match its taps' final counters, both directions."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.realvm.conftest import BUILD

pytestmark = [pytest.mark.realvm, pytest.mark.netns, pytest.mark.e2e]


def test_demo_on_real_guests_bills_what_the_taps_counted(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "kvmeter", "demo", "--real-vms", "--seconds", "15", "--linger", "0"]
    command += ["--workdir", str(tmp_path), "--vm-cache", str(BUILD)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "a real libvirtd and QEMU guests" in text
    assert "bob: VM.STOP" in text
    assert "the taps' final counters" in text
    truth = re.findall(
        r"^\s+([ir]-\d+(?:-\d+)?-VM)\s+(sent|received)\s+(\d+)\s+(\d+)\s+([+-]\d+)$", text, re.M
    )
    assert len(truth) == 6, text
    for vm, direction, taps, billed, diff in truth:
        assert int(taps) > 0, (vm, direction)
        assert (int(billed), diff) == (int(taps), "+0"), (vm, direction)
