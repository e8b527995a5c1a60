"""The all-in-one config: the agent's and the collector's sections validated by their own rules,
every problem reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmeter.pipeline.allinone import ConfigError, EventsFile, from_dict, load

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


def test_events_file_reads_whole_lines_once(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    feed = EventsFile(path)
    assert feed.read_new() == []  # not there yet
    path.write_bytes(b'{"a": 1}\n\n{"b": 2}\n{"c"')
    first = feed.read_new()
    assert [r.value for r in first] == [b'{"a": 1}', b'{"b": 2}']
    assert first[1].origin == f"{path}:3"
    with open(path, "ab") as f:
        f.write(b": 3}\n")
    assert [r.value for r in feed.read_new()] == [b'{"c": 3}']
    assert feed.read_new() == []
    path.write_bytes(b'{"new": 1}\n')  # replaced by a shorter file: start over
    assert [r.value for r in feed.read_new()] == [b'{"new": 1}']


def test_event_size_limit_is_the_collectors_key() -> None:
    assert load(EXAMPLE).collector.settings.max_event_bytes == 1024 * 1024
    cfg = from_dict({"lifecycle": {"events_file": "e.jsonl", "max_event_bytes": 2048}})
    assert cfg.collector.settings.max_event_bytes == 2048
    with pytest.raises(ConfigError) as err:
        from_dict({"lifecycle": {"max_event_bytes": 10}})
    assert any(p.startswith("lifecycle.max_event_bytes:") for p in err.value.problems)
