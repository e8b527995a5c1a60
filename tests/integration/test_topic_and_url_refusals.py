"""Settings the broker would refuse only once running are refused at start, by the real commands
from TOML (the invalid config's exit: the agent 2, the collector 1; the key named, a password
never shown): a Kafka topic name that is not legal
(the agent's batches waited in the spool with a log line a minute; a collector read nothing), a
RabbitMQ URL pika cannot read (a traceback at the first connection)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PASSWORD = "rabbit-s3cret-pw"


@pytest.mark.parametrize(
    ("command", "config", "key"),
    [
        ("agent", '[kafka]\nbootstrap_servers = "127.0.0.1:1"\ntopic = "kvmeter measures"\n', "kafka.topic"),
        ("collector", '[kafka]\nbootstrap = "127.0.0.1:1"\nmeasures_topic = "m/x"\n', "kafka.measures_topic"),
        (
            "collector",
            '[kafka]\nbootstrap = "127.0.0.1:1"\nlifecycle_topic = "café"\n',
            "kafka.lifecycle_topic",
        ),
        ("collector", f'[rabbitmq]\nurl = "amqp://kv:{PASSWORD}@mq:notaport/%2F"\n', "rabbitmq.url"),
        ("collector", f'[rabbitmq]\nurl = "amqp://kv:{PASSWORD}@mq/%2F?bogus=1"\n', "rabbitmq.url"),
    ],
)
def test_a_setting_the_broker_would_refuse_is_refused_at_start(
    tmp_path: Path, command: str, config: str, key: str
) -> None:
    path = tmp_path / "kvmeter.toml"
    path.write_text(config)
    done = subprocess.run(
        [sys.executable, "-m", "kvmeter", command, "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == (2 if command == "agent" else 1), done.stdout + done.stderr
    assert "invalid config" in done.stderr, done.stderr
    assert key in done.stderr, done.stderr
    assert PASSWORD not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr
