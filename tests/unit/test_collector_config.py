"""The collector's TOML configuration: defaults, the shipped example, every bad key at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmeter.collector import config
from kvmeter.collector.policy import BillingPolicy

EXAMPLE = Path(__file__).resolve().parents[2] / "packaging" / "config" / "collector.toml.example"


def test_the_shipped_example_is_valid_and_states_the_defaults() -> None:
    cfg = config.load(EXAMPLE)
    defaults = config.CollectorConfig()
    assert cfg.db_url == defaults.db_url
    assert cfg.settings == defaults.settings
    assert cfg.settings.billable == frozenset({"public"})
    assert (cfg.kafka.measures_topic, cfg.kafka.lifecycle_topic) == ("kvmeter.measures", "cloudstack")
    assert (cfg.api.host, cfg.api.port, bool(cfg.api.credentials)) == ("127.0.0.1", 8480, False)


def test_every_bad_key_is_reported_at_once() -> None:
    doc = {
        "bogus": 1,
        "store": {"url": "mysql://x"},
        "kafka": {"bootstrap": 9092, "batch_size": 0},
        "usage": {"window_seconds": 7, "billable_traffic_types": ["publik"], "grace_seconds": -1},
        "api": {"listen": "everywhere"},
    }
    with pytest.raises(config.ConfigError) as err:
        config.from_dict(doc, "collector.toml")
    problems = err.value.problems
    assert len(problems) == 8
    for where in ("bogus", "store.url", "kafka.bootstrap", "kafka.batch_size", "usage.grace_seconds",
                  "usage.billable_traffic_types.0", "api.listen"):  # fmt: skip
        assert any(p.startswith(where + ":") for p in problems), where
    assert "usage.window_seconds: 7 does not divide a day (86400)" in problems


def test_settings_router_owners_and_token_files(tmp_path: Path) -> None:
    (tmp_path / "owners.toml").write_text('"r-5-VM" = "acct-net-owner"\n')
    (tmp_path / "token").write_text("t0ken-0123456789ab\n")
    path = tmp_path / "collector.toml"
    path.write_text(
        """
[store]
url = "postgresql://kvmeter@db/kvmeter"
[usage]
window_seconds = 900
grace_seconds = 60
park_horizon_seconds = 600
billable_traffic_types = ["public", "guest"]
router_owners_file = "owners.toml"
[api]
listen = "0.0.0.0:9000"
token_file = "token"
"""
    )
    cfg = config.load(path)
    assert (cfg.settings.window_ms, cfg.settings.grace_ms, cfg.settings.park_horizon_ms) == (
        900_000,
        60_000,
        600_000,
    )
    assert cfg.settings.billable == frozenset({"public", "guest"})
    assert dict(cfg.settings.routers) == {"r-5-VM": "acct-net-owner"}
    assert (cfg.api.host, cfg.api.port) == ("0.0.0.0", 9000)
    grant = cfg.api.credentials.by_token("t0ken-0123456789ab")
    assert grant is not None
    assert grant.operator


def test_unreadable_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[usage\n")
    with pytest.raises(config.ConfigError, match="not valid TOML"):
        config.load(bad)
    owners = tmp_path / "owners.toml"
    owners.write_text('"r-5-VM" = 5\n')
    with pytest.raises(config.ConfigError, match="router_owners_file"):
        config.from_dict({"usage": {"router_owners_file": str(owners)}})


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [
        ("127.0.0.1:8480", "127.0.0.1", 8480),
        ("[::1]:8480", "::1", 8480),
        ("[::]:1", "::", 1),
        ("0.0.0.0:65535", "0.0.0.0", 65535),
        ("collector-1.example.org:8480", "collector-1.example.org", 8480),
        ("localhost:80", "localhost", 80),
    ],
)
def test_listen_addresses(listen: str, host: str, port: int) -> None:
    api = config.from_dict({"api": {"listen": listen}}).api
    assert (api.host, api.port) == (host, port)


@pytest.mark.parametrize(
    ("listen", "says"),
    [
        ("127.0.0.1:99999", "port '99999' is not 1-65535"),
        ("127.0.0.1:0", "port '0' is not 1-65535"),
        ("::1:8480", "IPv6 address goes in brackets"),
        ("[::g]:8480", "'::g' is not an IPv6 address"),
        ("[127.0.0.1]:8480", "not an IPv6 address"),
        ("300.1.2.3:8480", "'300.1.2.3' is not an IPv4 address"),
        ("-bad-.example:8480", "not a host name"),
        ("under_score:8480", "not a host name"),
        (":8480", "is not host:port"),
        ("8480", "is not host:port"),
        ("127.0.0.1:８４８０", "1-65535"),
    ],
)
def test_bad_listen_addresses_are_one_clear_problem(listen: str, says: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.from_dict({"api": {"listen": listen}}, "collector.toml")
    assert len(err.value.problems) == 1
    assert err.value.problems[0].startswith("api.listen: ")
    assert says in err.value.problems[0]


def test_lifecycle_event_size_limit() -> None:
    assert config.CollectorConfig().settings.max_event_bytes == 1024 * 1024
    cfg = config.from_dict({"lifecycle": {"max_event_bytes": 4096}})
    assert cfg.settings.max_event_bytes == 4096
    with pytest.raises(config.ConfigError) as err:
        config.from_dict({"lifecycle": {"max_event_bytes": "1M", "tail": True}})
    where = sorted(p.split(":")[0] for p in err.value.problems)
    assert where == ["lifecycle.max_event_bytes", "lifecycle.tail"]


def test_rabbitmq_and_webhook_sections(tmp_path: Path) -> None:
    cfg = config.from_dict(
        {"rabbitmq": {"url": "amqp://mq/%2F", "binding_keys": ["management-server.UsageEvent.#"]}}
    )
    assert cfg.rabbitmq.url == "amqp://mq/%2F"
    assert cfg.rabbitmq.exchange == "cloudstack-events"  # what CloudStack's docs name it
    assert cfg.rabbitmq.queue_type == "stream"
    assert cfg.rabbitmq.binding_keys == ("management-server.UsageEvent.#",)
    assert config.from_dict({}).rabbitmq.url == ""  # no RabbitMQ input
    (tmp_path / "hook.key").write_text("s3cret\n")
    assert (
        config.from_dict({"webhook": {"secret_key_file": "hook.key"}}, base=tmp_path).webhook_secret
        == "s3cret"
    )
    with pytest.raises(config.ConfigError) as err:
        config.from_dict(
            {
                "rabbitmq": {"url": "http://x", "queue_type": "quorum", "prefetch": 0, "binding_keys": []},
                "webhook": {"secret_key": "a", "secret_key_file": "b"},
            }
        )
    text = "\n".join(err.value.problems)
    for needle in (
        "rabbitmq.url",
        "rabbitmq.queue_type",
        "rabbitmq.prefetch",
        "rabbitmq.binding_keys",
        "exclude",
    ):
        assert needle in text
    with pytest.raises(config.ConfigError, match="secret_key"):
        config.from_dict({"webhook": {}})


def test_billing_policy_section() -> None:
    assert config.CollectorConfig().settings.policy == BillingPolicy()
    cfg = config.from_dict({"policy": {"allocated_from": "first_start", "running": "state"}})
    assert cfg.settings.policy == BillingPolicy(allocated_from="first_start", running="state")
    with pytest.raises(config.ConfigError) as err:
        config.from_dict({"policy": {"allocated_until": "delete", "running": "usage", "ip": "assign"}})
    assert sorted(err.value.problems) == [
        "policy.allocated_until: 'delete' is not one of ['destroy', 'expunge']",
        "policy.ip: unknown key (allowed here: allocated_from, allocated_until, ip_from, ip_until, running)",
    ]


def test_closed_resources_leave_memory_after_a_day_unless_told_otherwise() -> None:
    assert config.CollectorConfig().settings.evict_after_ms == 86_400_000
    assert (
        config.from_dict({"usage": {"evict_closed_after_seconds": 7200}}).settings.evict_after_ms == 7_200_000
    )
    assert config.from_dict({"usage": {"evict_closed_after_seconds": False}}).settings.evict_after_ms is None
    for bad in (True, -1, "1d"):
        with pytest.raises(config.ConfigError) as err:
            config.from_dict({"usage": {"evict_closed_after_seconds": bad}})
        assert [p.split(":")[0] for p in err.value.problems] == ["usage.evict_closed_after_seconds"]
