"""Agent config: the documented example validates, and every bad key is reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmeter.agent.config import AgentConfig, ConfigError, load, validate

EXAMPLE = Path(__file__).resolve().parents[2] / "packaging" / "config" / "agent.toml.example"


def test_documented_example_is_valid_and_shows_the_defaults() -> None:
    loaded = load(EXAMPLE)
    defaults = AgentConfig(host_id=loaded.host_id)
    for name in AgentConfig.__dataclass_fields__:
        if name != "traffic":
            assert getattr(loaded, name) == getattr(defaults, name), name
    assert loaded.traffic.classify("cloud0", None, None) == "control"


def test_empty_config_gives_the_defaults() -> None:
    config = validate({})
    assert (config.poll_interval, config.metrics_address, config.kafka_topic) == (
        10.0,
        "127.0.0.1",
        "kvmeter.measures",
    )


def test_every_bad_key_is_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(
        """
[agent]
poll_interval = -1
colour = "blue"
[kafka]
bootstrap_servers = 9092
[spool]
max_bytes = "big"
[metrics]
address = "0.0.0.0"
port = 70000
[traffic]
fallback = "bogus"
[wat]
x = 1
"""
    )
    with pytest.raises(ConfigError) as info:
        load(path)
    problems = "\n".join(info.value.problems)
    for needle in (
        "agent.poll_interval",
        "agent.colour: unknown key",
        "kafka.bootstrap_servers",
        "spool.max_bytes",
        "metrics.port",
        "metrics.address: '0.0.0.0' is not a loopback address",
        "traffic: 'fallback'",
        "wat: unknown key",
    ):
        assert needle in problems
    assert len(info.value.problems) == 8
    assert str(path) in str(info.value)


def test_missing_file_and_broken_toml_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[agent\npoll_interval = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(broken)


def test_values_land_in_their_fields() -> None:
    config = validate(
        {
            "agent": {"host_id": "kvm7", "poll_interval": 1, "state_dir": "/tmp/s"},
            "kafka": {"bootstrap_servers": "b:9092", "topic": "m", "properties": {"linger.ms": 5}},
            "spool": {"max_bytes": 10_000, "max_age_seconds": 60},
            "deltas": {"line_rate_ceiling_bps": 10**9},
            "metrics": {"address": "::1", "port": 0},
            "traffic": {"rules": [{"bridge": "cloudbr1", "type": "guest"}]},
        }
    )
    assert (config.host_id, config.poll_interval, config.kafka_properties) == ("kvm7", 1.0, {"linger.ms": 5})
    assert (config.spool_max_bytes, config.spool_max_age_seconds, config.line_rate_ceiling_bps) == (
        10_000,
        60.0,
        10**9,
    )
    assert (config.metrics_address, config.metrics_port) == ("::1", 0)
    assert config.traffic.classify("cloudbr1", None, None) == "guest"


def test_batches_fit_the_producers_message_max_bytes() -> None:
    assert validate({}).batch_bytes == 900_000
    assert validate({"agent": {"host_id": "kvm-07"}, "kafka": {"max_batch_bytes": 4096}}).batch_bytes == 4096
    small = {"agent": {"host_id": "kvm-07"}, "kafka": {"properties": {"message.max.bytes": 20_000}}}
    assert validate(small).batch_bytes == 20_000 - 200 - len("kvm-07")  # record framing and key
    as_text = {"agent": {"host_id": "kvm-07"}, "kafka": {"properties": {"message.max.bytes": "20000"}}}
    assert validate(as_text).batch_bytes == 20_000 - 206
    larger = {"kafka": {"max_batch_bytes": 300_000, "properties": {"message.max.bytes": 2_000_000}}}
    assert validate(larger).batch_bytes == 300_000


def test_a_message_max_bytes_that_leaves_no_room_for_a_batch_is_refused() -> None:
    for value, why in [(600, "leaves 394 bytes for a batch"), ("lots", "not a whole number"), (1e6, "whole")]:
        with pytest.raises(ConfigError) as err:
            validate({"agent": {"host_id": "kvm-07"}, "kafka": {"properties": {"message.max.bytes": value}}})
        assert "kafka.properties.message.max.bytes" in str(err.value)
        assert why in str(err.value)


def test_the_topics_limit_as_the_broker_states_it_lowers_the_batches_too() -> None:
    config = AgentConfig(host_id="kvm-07", kafka_topic_max_bytes=5000)
    assert config.batch_bytes == 5000 - 206
    both = AgentConfig(
        host_id="kvm-07", kafka_topic_max_bytes=9000, kafka_properties={"message.max.bytes": 7000}
    )
    assert both.batch_bytes == 7000 - 206
    assert AgentConfig(kafka_topic_max_bytes=100).batch_bytes == 512  # refused batches stay spooled


def test_the_check_apart_finds_what_the_validator_finds_in_process() -> None:
    from kvmeter.agent.config import SCHEMA
    from kvmeter.tomlconfig import schema_problems, schema_problems_apart

    doc = {"agent": {"poll_interval": "fast", "colour": 1}, "kafka": {"topic": 7}, "extra": {}}
    apart = schema_problems_apart(SCHEMA, doc)
    assert apart == schema_problems(SCHEMA, doc)
    assert len(apart) == 4, apart
    assert schema_problems_apart(SCHEMA, {"agent": {"host_id": "h"}}) == []


def test_the_agent_validates_its_config_without_holding_jsonschema(tmp_path: Path) -> None:
    # a fresh interpreter: this one has jsonschema loaded by other tests
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from kvmeter.agent import cli, daemon\n"
        "from kvmeter.agent.config import load\n"
        f"assert load({str(EXAMPLE)!r}).host_id\n"
        "held = sorted(m for m in sys.modules if m.split('.')[0] in ('jsonschema', 'referencing', 'rpds'))\n"
        "assert not held, held\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
