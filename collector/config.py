"""The collector's TOML configuration, validated against a JSON schema; every bad key is
reported at once (ConfigError lists them all).

Billable traffic types default to ["public"]: what CloudStack itself bills (VR public NIC,
shared/routed per-VM stats) and what a public cloud charges for. Guest, control, management
and storage traffic is metered and kept out of usage unless listed here.
"""

from __future__ import annotations

import ipaddress
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kvmeter.collector import credentials
from kvmeter.collector.api_params import PAGE_SIZE_CEILING, Paging
from kvmeter.collector.billing.tariff import Tariff
from kvmeter.collector.billing.tariff_file import BILLING_SCHEMA, billing_section
from kvmeter.collector.config_balances import BALANCES_SCHEMA, BalancesConfig, balances_config
from kvmeter.collector.config_cloudstack import CLOUDSTACK_SCHEMA, CloudStackConfig, cloudstack_config
from kvmeter.collector.config_handoff import HANDOFF_SCHEMA, HandoffConfig, handoff_config
from kvmeter.collector.config_retention import RETENTION_SCHEMA, retention_policy
from kvmeter.collector.credentials import Credentials
from kvmeter.collector.event_shapes import DEFAULT_MAX_EVENT_BYTES
from kvmeter.collector.model import Settings
from kvmeter.collector.policy import POLICY_SCHEMA, policy_from
from kvmeter.collector.retention import RetentionPolicy
from kvmeter.tomlconfig import KAFKA_TOPIC, ConfigError, read_toml, schema_problems

DAY_S = 86_400
TRAFFIC_TYPES = ["public", "guest", "management", "storage", "control", "private_gateway"]

# host:port or [IPv6]:port; listen_address() checks what a pattern cannot (port range, address).
LISTEN_PATTERN = r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$"
_HOST_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")

_PAGE_SIZE = {"type": "integer", "minimum": 1, "maximum": PAGE_SIZE_CEILING}

SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "store": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"url": {"type": "string", "pattern": "^(sqlite|postgres(ql)?(\\+[a-z0-9]+)?)://"}},
        },
        "kafka": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "bootstrap": {"type": "string", "minLength": 1},
                "measures_topic": KAFKA_TOPIC,
                "lifecycle_topic": KAFKA_TOPIC,
                "group": {"type": "string", "minLength": 1},
                "batch_size": {"type": "integer", "minimum": 1, "maximum": 100000},
                "degraded_after_seconds": {"type": "number", "exclusiveMinimum": 0},
                "rebuild_horizon_days": {"type": "integer", "minimum": 0, "maximum": 3650},
                "options": {
                    "type": "object",
                    "additionalProperties": {"type": ["string", "integer", "boolean"]},
                },
            },
        },
        "rabbitmq": {
            "type": "object",
            "additionalProperties": False,
            "required": ["url"],
            "properties": {
                "url": {"type": "string", "pattern": "^amqps?://"},
                "exchange": {"type": "string", "minLength": 1},
                "queue": {"type": "string", "minLength": 1},
                "queue_type": {"enum": ["stream", "classic"]},
                "binding_keys": {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
                "prefetch": {"type": "integer", "minimum": 1, "maximum": 65535},
            },
        },
        "webhook": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "secret_key": {"type": "string", "minLength": 1},
                "secret_key_file": {"type": "string", "minLength": 1},
            },
        },
        "usage": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "window_seconds": {"type": "integer", "minimum": 1, "maximum": DAY_S},
                "grace_seconds": {"type": "integer", "minimum": 0},
                "park_horizon_seconds": {"type": "integer", "minimum": 0},
                # false: every resource stays in memory
                "evict_closed_after_seconds": {
                    "anyOf": [{"type": "integer", "minimum": 0}, {"const": False}]
                },
                "tick_seconds": {"type": "number", "exclusiveMinimum": 0},
                "billable_traffic_types": {
                    "type": "array",
                    "items": {"enum": TRAFFIC_TYPES},
                    "uniqueItems": True,
                },
                "router_owners_file": {"type": "string"},
            },
        },
        "lifecycle": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"max_event_bytes": {"type": "integer", "minimum": 1024, "maximum": 1 << 30}},
        },
        "cloudstack": CLOUDSTACK_SCHEMA,
        "balances": BALANCES_SCHEMA,
        "policy": POLICY_SCHEMA,
        "retention": RETENTION_SCHEMA,
        "billing": BILLING_SCHEMA,
        "handoff": HANDOFF_SCHEMA,
        "api": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "enabled": {"type": "boolean"},
                "listen": {"type": "string", "pattern": LISTEN_PATTERN},
                **{k: _PAGE_SIZE for k in ("cloudstack_page_size", "page_size", "max_page_size")},
                **credentials.API_PROPERTIES,
            },
        },
    },
}


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap: str = ""
    measures_topic: str = "kvmeter.measures"
    lifecycle_topic: str = "cloudstack"
    group: str = "kvmeter-collector"
    batch_size: int = 1000
    degraded_after_s: float = 60.0  # /health turns degraded when no broker was reachable this long
    # The history `kvmeter rebuild` should find in the measures topic; the collector warns at
    # start when the topic keeps less (0: no check).
    rebuild_horizon_days: int = 0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RabbitConfig:
    """CloudStack's RabbitMQ event bus (reference §1.3): the exchange CloudStack publishes to and
    the durable queue the collector declares and binds (a stream by default: see input_rabbitmq)."""

    url: str = ""  # empty: no RabbitMQ input
    exchange: str = "cloudstack-events"
    queue: str = "kvmeter.cloudstack-events"
    queue_type: str = "stream"
    binding_keys: tuple[str, ...] = ("management-server.#",)
    prefetch: int = 500


@dataclass(frozen=True)
class ApiConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8480
    credentials: Credentials = field(default_factory=Credentials)  # the config file's own
    credentials_file: Path | None = None  # more of them, re-read on SIGHUP
    paging: Paging = field(default_factory=Paging)


@dataclass(frozen=True)
class CollectorConfig:
    db_url: str = "sqlite:////var/lib/kvmeter/collector/usage.db"
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    settings: Settings = field(default_factory=Settings)
    tick_seconds: float = 30.0
    api: ApiConfig = field(default_factory=ApiConfig)
    cloudstack: CloudStackConfig | None = None  # the reconciler's API access; None: no reconciler
    rabbitmq: RabbitConfig = field(default_factory=RabbitConfig)
    webhook_secret: str = ""  # [webhook]: CloudStack's webhook deliveries accepted when set
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)  # [retention]
    tariff: Tariff | None = None  # [billing] tariff_file: costs are rated under it; None: no costs
    tariff_file: Path | None = None
    handoff: HandoffConfig | None = None  # [handoff]: billable items to a topic / webhook; None: none
    balances: BalancesConfig | None = None  # [balances]: low-balance alerts; None: none


def load(path: str | Path) -> CollectorConfig:
    path = Path(path)
    return from_dict(read_toml(path), str(path), base=path.parent)


def from_dict(doc: dict[str, Any], source: str = "config", base: Path | None = None) -> CollectorConfig:
    problems = schema_problems(SCHEMA, doc)
    store, kafka, use, api, events = (doc.get(k, {}) for k in ("store", "kafka", "usage", "api", "lifecycle"))
    rabbit, webhook = (doc.get(k, {}) for k in ("rabbitmq", "webhook"))
    window_s = use.get("window_seconds", 3600) if isinstance(use, dict) else 3600
    if isinstance(window_s, int) and window_s > 0 and DAY_S % window_s:
        problems.append(f"usage.window_seconds: {window_s} does not divide a day (86400)")
    routers: dict[str, str] = {}
    owners_file = use.get("router_owners_file", "") if isinstance(use, dict) else ""
    if isinstance(owners_file, str) and owners_file:
        owners_path = Path(owners_file) if base is None else base / owners_file
        try:
            routers = load_router_owners(owners_path)
        except ValueError as exc:
            problems.append(f"usage.router_owners_file: {exc}")
    if isinstance(rabbit, dict):
        problems += _rabbit_url_problems(rabbit.get("url"))
    creds, creds_file, more = credentials.from_api_section(api if isinstance(api, dict) else {}, base)
    problems += more
    webhook_secret = webhook.get("secret_key", "") if isinstance(webhook, dict) else ""
    secret_file = webhook.get("secret_key_file", "") if isinstance(webhook, dict) else ""
    if webhook_secret and secret_file:
        problems.append("webhook: secret_key and secret_key_file exclude each other")
    elif isinstance(secret_file, str) and secret_file:
        try:
            webhook_secret = (Path(secret_file) if base is None else base / secret_file).read_text().strip()
        except OSError as exc:
            problems.append(f"webhook.secret_key_file: cannot read {secret_file}: {exc.strerror}")
    if "webhook" in doc and isinstance(webhook, dict) and not webhook_secret and not problems:
        problems.append("webhook: secret_key (or secret_key_file) is required: deliveries are signed with it")
    host, port = "127.0.0.1", 8480
    listen = api.get("listen") if isinstance(api, dict) else None
    if isinstance(listen, str):
        try:
            host, port = listen_address(listen)
        except ValueError as exc:  # says more than the schema's pattern
            problems = [p for p in problems if not p.startswith("api.listen:")]
            problems.append(f"api.listen: {exc}")
    paging = _paging(api if isinstance(api, dict) else {}, problems)
    cloudstack = cloudstack_config(doc.get("cloudstack"), base, problems)
    retention = retention_policy(doc.get("retention"), problems)
    billable = use.get("billable_traffic_types", ["public"]) if isinstance(use, dict) else []
    tariff, tariff_file = billing_section(doc.get("billing"), base, billable, problems)
    bootstrap = kafka.get("bootstrap", "") if isinstance(kafka, dict) else ""
    handoff = handoff_config(doc.get("handoff"), bootstrap, base, problems)
    balances = balances_config(doc.get("balances"), problems, priced=tariff_file is not None)
    if problems:
        raise ConfigError(source, problems)
    return CollectorConfig(
        db_url=store.get("url", CollectorConfig.db_url),
        kafka=KafkaConfig(
            bootstrap=kafka.get("bootstrap", ""),
            measures_topic=kafka.get("measures_topic", KafkaConfig.measures_topic),
            lifecycle_topic=kafka.get("lifecycle_topic", KafkaConfig.lifecycle_topic),
            group=kafka.get("group", KafkaConfig.group),
            batch_size=kafka.get("batch_size", KafkaConfig.batch_size),
            degraded_after_s=float(kafka.get("degraded_after_seconds", KafkaConfig.degraded_after_s)),
            rebuild_horizon_days=kafka.get("rebuild_horizon_days", KafkaConfig.rebuild_horizon_days),
            options=dict(kafka.get("options", {})),
        ),
        settings=Settings(
            window_ms=window_s * 1000,
            grace_ms=use.get("grace_seconds", 7200) * 1000,
            park_horizon_ms=use.get("park_horizon_seconds", DAY_S) * 1000,
            billable=frozenset(use.get("billable_traffic_types", ["public"])),
            routers=routers,
            max_event_bytes=events.get("max_event_bytes", DEFAULT_MAX_EVENT_BYTES),
            policy=policy_from(doc.get("policy", {})),
            evict_after_ms=_evict_after_ms(use.get("evict_closed_after_seconds", DAY_S)),
        ),
        tick_seconds=float(use.get("tick_seconds", 30.0)),
        api=ApiConfig(
            enabled=api.get("enabled", True),
            host=host,
            port=port,
            credentials=creds,
            credentials_file=creds_file,
            paging=paging,
        ),
        cloudstack=cloudstack,
        rabbitmq=RabbitConfig(
            url=rabbit.get("url", ""),
            exchange=rabbit.get("exchange", RabbitConfig.exchange),
            queue=rabbit.get("queue", RabbitConfig.queue),
            queue_type=rabbit.get("queue_type", RabbitConfig.queue_type),
            binding_keys=tuple(rabbit.get("binding_keys", RabbitConfig.binding_keys)),
            prefetch=rabbit.get("prefetch", RabbitConfig.prefetch),
        ),
        webhook_secret=webhook_secret,
        retention=retention,
        tariff=tariff,
        tariff_file=tariff_file,
        handoff=handoff,
        balances=balances,
    )


def _rabbit_url_problems(url: Any) -> list[str]:
    """What pika would refuse at the first connection (a port that is no number, an unknown or
    malformed query parameter), said at start; the URL's password never shown."""
    if not isinstance(url, str) or not url.startswith(("amqp://", "amqps://")):
        return []  # the schema says what is wrong with it
    import pika

    try:
        pika.URLParameters(url)
    except ValueError as exc:
        password = urlsplit(url).password
        why = str(exc).replace(password, "***") if password else str(exc)
        return [f"rabbitmq.url: {why}"]
    return []


def _paging(api: dict[str, Any], problems: list[str]) -> Paging:
    sizes = {
        k: v
        for k in ("cloudstack_page_size", "page_size", "max_page_size")
        if isinstance(v := api.get(k), int)
    }
    if "page_size" not in sizes and "max_page_size" in sizes:  # the default page fits any maximum
        sizes["page_size"] = min(Paging.page_size, sizes["max_page_size"])
    paging = Paging(**sizes)
    if paging.page_size > paging.max_page_size:
        problems.append(
            f"api.page_size: {paging.page_size} is above api.max_page_size ({paging.max_page_size})"
        )
    return paging


def _evict_after_ms(seconds: object) -> int | None:
    """`false` keeps every resource in memory."""
    return None if seconds is False or not isinstance(seconds, int) else seconds * 1000


def listen_address(text: str) -> tuple[str, int]:
    """`host:port` or `[IPv6 address]:port` -> (host, port), port 1-65535; ValueError says why not."""
    host, colon, port_text = text.rpartition(":")
    if not colon or not host:
        raise ValueError(f"{text!r} is not host:port (IPv6 as [::1]:8480)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"{text!r}: an IPv6 address goes in brackets, as in [::1]:8480")
    elif host.replace(".", "").isdigit():
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv4 address") from None
    elif len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in host.split(".")):
        raise ValueError(f"{host!r} is not a host name or address")
    if not (port_text.isascii() and port_text.isdigit() and 1 <= int(port_text) <= 65535):
        raise ValueError(f"port {port_text!r} is not 1-65535")
    return host, int(port_text)


def load_router_owners(path: Path) -> dict[str, str]:
    """The operator's router -> account map: TOML or JSON, `"r-5-VM" = "<account uuid>"` (a
    router's domain name or VM uuid as key)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    try:
        doc = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path} is not valid {path.suffix.lstrip('.') or 'TOML'}: {exc}") from None
    bad = [k for k, v in doc.items() if not isinstance(v, str) or not v]
    if bad:
        raise ValueError(f"{path}: owners must be non-empty account uuid strings (bad: {', '.join(bad)})")
    return dict(doc)
