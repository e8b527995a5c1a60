"""`kvmeter agent` front door: a bad config stops it before anything starts, listing every
problem; logs are one journal line per record with a syslog priority prefix."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from click.testing import CliRunner

from kvmeter.agent.cli import agent
from kvmeter.cli import main
from kvmeter.logs import JournalFormatter


def test_bad_config_exits_2_and_lists_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[agent]\npoll_interval = "often"\nshade = 1\n[metrics]\naddress = "10.0.0.1"\n')
    result = CliRunner().invoke(main, ["agent", "--config", str(path)])
    assert result.exit_code == 2
    assert "agent.poll_interval" in result.output
    assert "agent.shade: unknown key" in result.output
    assert "metrics.address" in result.output
    assert "3 problem(s)" in result.output


def test_missing_config_file_is_an_error_for_the_daemon(tmp_path: Path) -> None:
    result = CliRunner().invoke(agent, ["--config", str(tmp_path / "none.toml")])
    assert result.exit_code == 2
    assert "file not found" in result.output


def test_journal_formatter_prefixes_priority_and_keeps_tracebacks_on_one_line() -> None:
    formatter = JournalFormatter()
    record = logging.LogRecord("kvmeter.agent.daemon", logging.WARNING, __file__, 1, "spool %d", (3,), None)
    assert formatter.format(record) == "<4>kvmeter.agent.daemon: spool 3"
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = formatter.format(record)
    assert line.startswith("<3>x: failed | Traceback")
    assert "\n" not in line
    assert "ValueError: boom" in line
