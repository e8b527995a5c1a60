"""The all-in-one config: the agent's and the collector's sections validated by their own rules,
every problem reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmeter.collector.policy import BillingPolicy
from kvmeter.pipeline.allinone import ConfigError, from_dict, load

EXAMPLE = Path(__file__).parents[2] / "packaging" / "config" / "allinone.toml.example"


def test_the_shipped_example_is_valid() -> None:
    cfg = load(EXAMPLE)
    assert cfg.agent.poll_interval == 10.0
    assert cfg.collector.db_url.endswith("/collector/usage.db")
    assert cfg.events_file == Path("/var/lib/kvmeter/collector/cloudstack-events.jsonl")


def test_every_bad_key_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        from_dict(
            {
                "agent": {"poll_interval": -1},
                "usage": {"window_seconds": 7},
                "kafka": {"bootstrap_servers": "x:9092"},
                "lifecycle": {"events_file": 3, "tail": True},
            }
        )
    text = str(err.value)
    for needle in ("poll_interval", "window_seconds", "kafka: unknown section", "events_file", "tail"):
        assert needle in text
    assert len(err.value.problems) >= 5


def test_relative_events_file_is_next_to_the_config(tmp_path: Path) -> None:
    cfg = from_dict({"lifecycle": {"events_file": "events.jsonl"}}, base=tmp_path)
    assert cfg.events_file == tmp_path / "events.jsonl"


def test_event_size_limit_is_the_collectors_key() -> None:
    assert load(EXAMPLE).collector.settings.max_event_bytes == 1024 * 1024
    cfg = from_dict({"lifecycle": {"events_file": "e.jsonl", "max_event_bytes": 2048}})
    assert cfg.collector.settings.max_event_bytes == 2048
    with pytest.raises(ConfigError) as err:
        from_dict({"lifecycle": {"max_event_bytes": 10}})
    assert any(p.startswith("lifecycle.max_event_bytes:") for p in err.value.problems)


def test_billing_policy_is_the_collectors_section() -> None:
    assert load(EXAMPLE).collector.settings.policy == BillingPolicy()
    cfg = from_dict({"policy": {"allocated_until": "expunge"}})
    assert cfg.collector.settings.policy == BillingPolicy(allocated_until="expunge")
    with pytest.raises(ConfigError) as err:
        from_dict({"policy": {"running": "sometimes"}})
    assert err.value.problems == [
        "policy.running: 'sometimes' is not one of ['usage_and_state', 'usage', 'state']"
    ]
