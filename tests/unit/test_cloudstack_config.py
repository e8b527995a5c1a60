"""The [cloudstack] section of the collector's and the all-in-one's TOML."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmeter.collector import config
from kvmeter.pipeline import allinone

ENDPOINT = "https://cloud.example.com/client/api"


def test_absent_means_no_reconciler() -> None:
    assert config.from_dict({}).cloudstack is None


def test_key_pair_and_defaults() -> None:
    cfg = config.from_dict(
        {"cloudstack": {"endpoint": ENDPOINT, "api_key": "k", "secret_key": "s"}}
    ).cloudstack
    assert cfg is not None
    assert (cfg.endpoint, cfg.api_key, cfg.secret_key, cfg.period_s, cfg.timeout_s) == (
        ENDPOINT,
        "k",
        "s",
        300.0,
        30.0,
    )


def test_key_file_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "keys.toml").write_text('api_key = "k2"\nsecret_key = "s2"\n')
    doc = {"cloudstack": {"endpoint": ENDPOINT, "key_file": "keys.toml", "period_seconds": 60}}
    cfg = config.from_dict(doc, base=tmp_path).cloudstack
    assert cfg is not None
    assert (cfg.api_key, cfg.secret_key, cfg.period_s) == ("k2", "s2", 60.0)


@pytest.mark.parametrize(
    ("section", "says"),
    [
        ({"endpoint": ENDPOINT}, "an operator key pair is required"),
        ({"endpoint": "ftp://x", "api_key": "k", "secret_key": "s"}, "cloudstack.endpoint"),
        ({"api_key": "k", "secret_key": "s"}, "'endpoint' is a required property"),
        ({"endpoint": ENDPOINT, "api_key": "k", "secret_key": "s", "key_file": "x"}, "not both"),
        ({"endpoint": ENDPOINT, "key_file": "missing.toml"}, "cloudstack.key_file: cannot read"),
        ({"endpoint": ENDPOINT, "api_key": "k", "secret_key": "s", "period_seconds": 0}, "period_seconds"),
        ({"endpoint": ENDPOINT, "api_key": "k", "secret_key": "s", "colour": 1}, "colour"),
    ],
)
def test_bad_sections_are_reported(tmp_path: Path, section: dict, says: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.from_dict({"cloudstack": section}, base=tmp_path)
    assert any(says in p for p in err.value.problems), err.value.problems


def test_the_all_in_one_takes_the_section() -> None:
    doc = {"cloudstack": {"endpoint": ENDPOINT, "api_key": "k", "secret_key": "s"}}
    cfg = allinone.from_dict(doc)
    assert cfg.collector.cloudstack is not None
    assert cfg.collector.cloudstack.endpoint == ENDPOINT
