"""A store that cannot be opened is named without its password (`user:PASSWORD@` or
`?password=`), by every command that opens one: stderr goes to the journal and to terminals."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

PASSWORD = "s3cret-store-pw"


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://kvmeter:{PASSWORD}@127.0.0.1:1/usage",
        f"postgresql://127.0.0.1:1/usage?user=k&password={PASSWORD}",
    ],
)
@pytest.mark.parametrize(
    ("command", "config"),
    [
        ("collector", '[store]\nurl = "{url}"\n[kafka]\nbootstrap = "127.0.0.1:1"\n'),
        ("run --all-in-one", '[store]\nurl = "{url}"\n[agent]\nstate_dir = "{state}"\n'),
        ("usage --start 2026-01-01 --end 2026-01-02 --db {url}", ""),
        ("costs --db {url} --tariff {tariff}", ""),
    ],
)
def test_a_store_that_cannot_be_opened_is_named_without_its_password(
    tmp_path: Path, url: str, command: str, config: str
) -> None:
    tariff = Path(__file__).resolve().parents[2] / "packaging" / "config" / "tariff.toml.example"
    args = command.format(url=url, tariff=tariff).split()
    if config:
        path = tmp_path / "kvmeter.toml"
        path.write_text(config.format(url=url, state=tmp_path / "state"))
        args += ["--config", str(path)]
    done = subprocess.run(
        [sys.executable, "-m", "kvmeter", *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "cannot open the store postgresql://" in done.stderr, done.stderr[-2000:]
    assert "***" in done.stderr
    assert PASSWORD not in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


@pytest.mark.pg
def test_the_collectors_start_line_names_its_store_without_a_query_password(pg_database: str) -> None:
    """The start line (`store ...; window ...`) goes to the journal: a password given as
    `?password=` (libpq takes either form) is hidden there as the one in `user:pw@` is."""
    url = pg_database + ("&" if "?" in pg_database else "?") + f"password={PASSWORD}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "collector.toml"
        path.write_text(
            f'[store]\nurl = "{url}"\n[kafka]\nbootstrap = "127.0.0.1:1"\n[api]\nenabled = false\n'
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvmeter", "collector", "--config", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines: list[str] = []
        try:
            assert proc.stderr is not None
            for line in proc.stderr:
                lines.append(line)
                if " store postgresql" in line:
                    break
        finally:
            proc.kill()
            proc.communicate()
    start = [line for line in lines if " store postgresql" in line]
    assert start, "".join(lines)[-2000:]
    assert PASSWORD not in "".join(lines)
    assert "password=***" in start[0]
