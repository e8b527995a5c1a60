"""A config file that is not UTF-8 (a "€" in a comment saved as cp1252) is an invalid config
naming why, from the real commands (the agent and the all-in-one exit 2, the collector 1), never
a traceback. A tariff file: test_tariff_file_edges.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

NOT_UTF8 = b"# prix en \x80 par GiB\n"


@pytest.mark.parametrize(
    ("command", "body"),
    [
        ("agent", b'[agent]\nhost_id = "h1"\n'),
        ("collector", b'[store]\nurl = "sqlite:///usage.db"\n'),
        ("run", b'[agent]\nhost_id = "h1"\n'),
    ],
)
def test_a_config_that_is_not_utf8_is_refused_with_the_reason(
    tmp_path: Path, command: str, body: bytes
) -> None:
    path = tmp_path / "kvmeter.toml"
    path.write_bytes(NOT_UTF8 + body)
    args = [command, *(["--all-in-one"] if command == "run" else []), "--config", str(path)]
    done = subprocess.run(
        [sys.executable, "-m", "kvmeter", *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == (1 if command == "collector" else 2), done.stdout + done.stderr
    assert "not UTF-8" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
