"""The agent's config, CLI and start at their edges: librdkafka's secrets never quoted, nan and
inf durations, whole numbers written as floats, a negative --window, a state_dir or metrics port
the agent cannot have."""

from __future__ import annotations

import math
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

import kvmeter.agent.cli as agent_cli
import kvmeter.agent.config as agent_config
from kvmeter.agent.config import ConfigError, validate
from kvmeter.agent.metrics import AgentMetrics
from kvmeter.cli import main
from kvmeter.tomlconfig import schema_problems

SECRET = "hunter2-kafka-secret"


@pytest.fixture
def signals_kept() -> Iterator[None]:
    """`kvmeter agent` run in-process installs its SIGTERM, SIGINT and SIGHUP handlers."""
    kept = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    yield
    for signum, handler in kept.items():
        signal.signal(signum, handler)


@pytest.mark.parametrize(
    "key", ["sasl.password", "ssl.key.password", "ssl.keystore.password", "sasl.oauthbearer.client.secret"]
)
def test_a_librdkafka_secret_in_kafka_properties_is_never_quoted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    """A [kafka.properties] secret (sasl.password, ssl.key.password, ...) with a value of the wrong
    type is reported by its key and rule, never with its value (stderr goes to the journal).
    (The agent's check runs `schema_problems` in a child interpreter: here in-process.)"""
    monkeypatch.setattr(agent_config, "schema_problems_apart", schema_problems)
    path = tmp_path / "agent.toml"
    path.write_text(f'[kafka.properties]\n"{key}" = ["{SECRET}"]\n')
    result = CliRunner().invoke(main, ["agent", "--config", str(path)])
    assert result.exit_code == 2
    assert f"kafka.properties.{key}" in result.output
    assert SECRET not in result.output


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("agent", "poll_interval"),
        ("libvirt", "resync_seconds"),
        ("libvirt", "call_timeout"),
        ("spool", "max_age_seconds"),
    ],
)
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nan_and_inf_durations_are_refused(section: str, key: str, value: float) -> None:
    """TOML's nan and inf are refused for every duration: with poll_interval = nan the agent polled
    once and then spun at 100% CPU never polling again; with inf it polled once and died of an
    OverflowError (no final flush); a spool max_age_seconds of either stopped the start with a
    traceback."""
    with pytest.raises(ConfigError) as caught:
        validate({section: {key: value}})
    assert any(p.startswith(f"{section}.{key}:") for p in caught.value.problems)


def test_whole_numbers_written_as_floats_are_taken_as_integers() -> None:
    """The schema's integers take 9477.0 and 1e9 (JSON schema has one number type), so the agent
    must use them as integers: `[metrics] port = 9477.0` passed validation and then the start
    died of an OSError traceback ("Int or String expected") when the metrics port was opened."""
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    config = validate({"metrics": {"port": float(port)}, "spool": {"max_bytes": 1e9}})
    assert (config.metrics_port, config.spool_max_bytes) == (port, 1_000_000_000)
    served = AgentMetrics().serve(config.metrics_address, config.metrics_port)
    server = served[0] if isinstance(served, tuple) else served
    server.shutdown()
    server.server_close()


def _config(tmp_path: Path, state_dir: Path, metrics: str = "enabled = false") -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f'[agent]\nstate_dir = "{state_dir}"\npoll_interval = 0.2\n'
        '[libvirt]\nuri = "test:///default"\n'
        '[kafka]\nbootstrap_servers = "127.0.0.1:1"\n'
        f"[metrics]\n{metrics}\n"
    )
    return path


def test_once_with_a_negative_window_is_a_usage_error(tmp_path: Path) -> None:
    """`kvmeter agent --once --window -1` is a usage error (exit 2), not a ValueError traceback from
    time.sleep after libvirt and the spool were opened."""
    path = _config(tmp_path, tmp_path / "state")
    result = CliRunner().invoke(main, ["agent", "--config", str(path), "--once", "--window", "-1"])
    assert result.exit_code == 2, result.exception
    assert "--window" in result.output


def test_a_state_dir_that_cannot_be_made_stops_the_start_in_one_line(
    tmp_path: Path, signals_kept: None
) -> None:
    """An agent.state_dir that cannot be created (here below a regular file) stops the start with
    one line naming the path and the setting, exit 1: no traceback."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    path = _config(tmp_path, blocker / "agent")
    result = CliRunner().invoke(main, ["agent", "--config", str(path)])
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1
    assert "agent.state_dir" in result.output
    assert str(blocker) in result.output


def test_a_metrics_port_in_use_stops_the_start_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signals_kept: None
) -> None:
    """[metrics] port already taken (another exporter): the start stops with one line naming the
    address and port, exit 1, no OSError traceback."""
    monkeypatch.setattr(agent_cli, "_fitted_to_topic", lambda config: config)  # no broker to ask
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        path = _config(tmp_path, tmp_path / "state", f'enabled = true\naddress = "127.0.0.1"\nport = {port}')
        result = CliRunner().invoke(main, ["agent", "--config", str(path)])
    finally:
        taken.close()
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1
    assert f"127.0.0.1:{port}" in result.output
