"""[handoff] in the collector's and the all-in-one's TOML: parsed, and refused with every
problem at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmeter.collector import config
from kvmeter.pipeline import allinone


def test_no_section_no_hand_off() -> None:
    assert config.from_dict({}).handoff is None


def test_a_topic_takes_the_kafka_bootstrap_and_a_webhook_its_secret_file(tmp_path: Path) -> None:
    (tmp_path / "handoff.secret").write_text("s3cret\n")
    cfg = config.from_dict(
        {
            "kafka": {"bootstrap": "k1:9092"},
            "handoff": {
                "topic": "kvmeter.billable",
                "webhook_url": "https://billing.example.com/items",
                "webhook_headers": {"Authorization": "Bearer x"},
                "webhook_secret_file": "handoff.secret",
                "retry_attempts": 7,
                "lease_seconds": 120,
            },
        },
        base=tmp_path,
    ).handoff
    assert cfg is not None
    assert (cfg.topic, cfg.bootstrap, cfg.webhook_secret) == ("kvmeter.billable", "k1:9092", "s3cret")
    assert (cfg.retry_attempts, cfg.lease_ms, cfg.timeout_s) == (7, 120_000, 10.0)
    assert cfg.webhook_headers == {"Authorization": "Bearer x"}


def test_every_bad_key_is_reported_at_once() -> None:
    with pytest.raises(config.ConfigError) as err:
        config.from_dict(
            {
                "handoff": {
                    "topic": "billable",  # no broker anywhere
                    "webhook_url": "ftp://x",
                    "webhook_headers": {"Idempotency-Key": "mine", "X-Ok": "a\nb"},
                    "retry_initial_seconds": 10,
                    "retry_max_seconds": 1,
                    "timeout_seconds": 30,
                    "lease_seconds": 5,
                    "colour": "blue",
                }
            }
        )
    text = "\n".join(err.value.problems)
    for needle in (
        "handoff.webhook_url",
        "colour",
        "needs a broker",
        "'Idempotency-Key' is not a header name",
        "X-Ok: a value on one line",
        "retry_max_seconds must be at least",
        "lease_seconds must be longer",
    ):
        assert needle in text, text


def test_the_section_needs_a_sink_and_secrets_need_the_webhook() -> None:
    with pytest.raises(config.ConfigError) as err:
        config.from_dict({"handoff": {"webhook_secret": "s"}})
    assert err.value.problems == [
        "handoff: name a topic, a webhook_url or both",
        "handoff: webhook_headers and webhook_secret need a webhook_url",
    ]


def test_the_all_in_one_takes_the_section() -> None:
    cfg = allinone.from_dict({"handoff": {"webhook_url": "http://127.0.0.1:9/items"}})
    assert cfg.collector.handoff is not None
    assert cfg.collector.handoff.webhook_url == "http://127.0.0.1:9/items"
