"""The agent's TOML config: schema, defaults, and validation that reports every bad key at once."""

from __future__ import annotations

import ipaddress
import math
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmeter.agent.traffic import TrafficRules, TrafficRulesError
from kvmeter.tomlconfig import KAFKA_TOPIC, ConfigError, read_toml, schema_problems_apart

DEFAULT_PATH = "/etc/kvmeter/agent.toml"

# What Kafka adds around a batch, with room to spare: librdkafka counts a record's framing (at
# most 36 bytes) and its key against message.max.bytes, the broker also the batch header (61).
RECORD_OVERHEAD = 200
MIN_BATCH_BYTES = 512  # a batch's header and one measure or inventory record

_POSITIVE = {"type": "number", "exclusiveMinimum": 0}
_COUNT = {"type": "integer", "minimum": 1}
_STR = {"type": "string", "minLength": 1}

SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "agent": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "host_id": _STR,
                "poll_interval": _POSITIVE,
                "state_dir": _STR,
                "log_level": {"enum": ["debug", "info", "warning", "error"]},
                "inventory_every": _COUNT,
            },
        },
        "libvirt": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "uri": _STR,
                "resync_seconds": _POSITIVE,
                "call_timeout": _POSITIVE,
            },
        },
        "kafka": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "bootstrap_servers": _STR,
                "topic": KAFKA_TOPIC,
                "max_in_flight": _COUNT,
                "max_batch_bytes": {"type": "integer", "minimum": 1024},
                "properties": {
                    "type": "object",
                    "additionalProperties": {"type": ["string", "integer", "number", "boolean"]},
                },
            },
        },
        "spool": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "max_bytes": _COUNT,
                "max_age_seconds": _POSITIVE,
                "segment_bytes": {"type": "integer", "minimum": 4096},
            },
        },
        "deltas": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"line_rate_ceiling_bps": _COUNT},
        },
        "metrics": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "enabled": {"type": "boolean"},
                "address": _STR,
                "port": {"type": "integer", "minimum": 0, "maximum": 65535},
            },
        },
        "traffic": {"type": "object"},  # checked by TrafficRules.from_config
    },
}


@dataclass(frozen=True)
class AgentConfig:
    host_id: str = field(default_factory=socket.gethostname)
    poll_interval: float = 10.0
    state_dir: str = "/var/lib/kvmeter/agent"
    log_level: str = "info"
    inventory_every: int = 60  # polls between batches with every inventory record (else: the changed)
    libvirt_uri: str = "qemu:///system"
    libvirt_resync_seconds: float = 300.0
    libvirt_call_timeout: float = 2.0
    kafka_bootstrap: str = "localhost:9092"
    kafka_topic: str = "kvmeter.measures"
    kafka_max_in_flight: int = 1000
    # A poll bigger than this goes out as several consecutive batches: below librdkafka's and
    # the broker's default message.max.bytes (1,000,000 and 1,048,588).
    kafka_max_batch_bytes: int = 900_000
    kafka_properties: dict[str, Any] = field(default_factory=dict)
    spool_max_bytes: int = 1 << 30
    spool_max_age_seconds: float = 7 * 24 * 3600.0
    spool_segment_bytes: int = 4 << 20
    line_rate_ceiling_bps: int = 100_000_000_000
    metrics_enabled: bool = True
    metrics_address: str = "127.0.0.1"
    metrics_port: int = 9477
    traffic: TrafficRules = field(default_factory=lambda: TrafficRules.from_config(None))
    # Not in the file: the topic's max.message.bytes as the broker stated it at start (if it did)
    kafka_topic_max_bytes: int | None = None

    @property
    def batch_bytes(self) -> int:
        """The largest batch a poll goes out in: kafka.max_batch_bytes, or less when the
        producer's message.max.bytes ([kafka.properties]) or the topic's max.message.bytes
        would refuse a batch that size."""
        limits = [_message_max_bytes(self.kafka_properties), self.kafka_topic_max_bytes]
        key = len(self.host_id.encode())
        fitted = min([self.kafka_max_batch_bytes] + [n - RECORD_OVERHEAD - key for n in limits if n])
        return max(fitted, MIN_BATCH_BYTES)  # a topic's tiny limit: what it refuses stays spooled, logged


def _message_max_bytes(properties: Mapping[str, Any]) -> int | None:
    value = properties.get("message.max.bytes")
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except ValueError:
        return None


# (section, key) -> AgentConfig field
_FIELDS = {
    ("agent", "host_id"): "host_id",
    ("agent", "poll_interval"): "poll_interval",
    ("agent", "state_dir"): "state_dir",
    ("agent", "log_level"): "log_level",
    ("agent", "inventory_every"): "inventory_every",
    ("libvirt", "uri"): "libvirt_uri",
    ("libvirt", "resync_seconds"): "libvirt_resync_seconds",
    ("libvirt", "call_timeout"): "libvirt_call_timeout",
    ("kafka", "bootstrap_servers"): "kafka_bootstrap",
    ("kafka", "topic"): "kafka_topic",
    ("kafka", "max_in_flight"): "kafka_max_in_flight",
    ("kafka", "max_batch_bytes"): "kafka_max_batch_bytes",
    ("kafka", "properties"): "kafka_properties",
    ("spool", "max_bytes"): "spool_max_bytes",
    ("spool", "max_age_seconds"): "spool_max_age_seconds",
    ("spool", "segment_bytes"): "spool_segment_bytes",
    ("deltas", "line_rate_ceiling_bps"): "line_rate_ceiling_bps",
    ("metrics", "enabled"): "metrics_enabled",
    ("metrics", "address"): "metrics_address",
    ("metrics", "port"): "metrics_port",
}

_DURATIONS = ("poll_interval", "libvirt_resync_seconds", "libvirt_call_timeout", "spool_max_age_seconds")
_INTEGERS = [
    name
    for (section, key), name in _FIELDS.items()
    if SCHEMA["properties"][section]["properties"][key].get("type") == "integer"
]


def validate(data: Mapping[str, Any], source: str = "config") -> AgentConfig:
    """An AgentConfig from parsed TOML, or ConfigError listing every problem."""
    problems = schema_problems_apart(SCHEMA, data)  # jsonschema stays out of the daemon
    values: dict[str, Any] = {}
    for (section, key), name in _FIELDS.items():
        sect = data.get(section)
        if isinstance(sect, Mapping) and key in sect:
            values[name] = sect[key]
    address = values.get("metrics_address", "127.0.0.1")
    if isinstance(address, str) and not _is_loopback(address):
        problems.append(f"metrics.address: {address!r} is not a loopback address (metrics stay on the host)")
    try:
        traffic = data.get("traffic")
        values["traffic"] = TrafficRules.from_config(traffic if isinstance(traffic, Mapping) else None)
    except TrafficRulesError as exc:
        problems.extend(f"traffic: {p}" for p in exc.problems)
    problems.extend(_batch_problems(values))
    problems.extend(_non_finite_problems(values))
    if problems:
        raise ConfigError(source, problems)
    for name in _DURATIONS:
        if name in values:
            values[name] = float(values[name])
    for name in _INTEGERS:  # the schema's integers take 9477.0 and 1e9 too (JSON has one number type)
        if name in values:
            values[name] = int(values[name])
    return AgentConfig(**values)


def _non_finite_problems(values: Mapping[str, Any]) -> list[str]:
    """TOML's nan and inf pass the schema's bounds: an interval of nan never comes round (the
    loop spins), one of inf makes the loop's wait fail, a spool age of either stops the start."""
    keys = {name: f"{section}.{key}" for (section, key), name in _FIELDS.items()}
    return [
        f"{keys[name]}: {values[name]!r} is not a finite number"
        for name in _DURATIONS
        if isinstance(values.get(name), float) and not math.isfinite(values[name])
    ]


def _batch_problems(values: Mapping[str, Any]) -> list[str]:
    properties = values.get("kafka_properties")
    if not isinstance(properties, Mapping) or "message.max.bytes" not in properties:
        return []
    value = properties["message.max.bytes"]
    limit = None if isinstance(value, (bool, float)) else _message_max_bytes(properties)
    if limit is None:
        return [f"kafka.properties.message.max.bytes: {value!r} is not a whole number of bytes"]
    host = values.get("host_id")
    key = len(host.encode()) if isinstance(host, str) else len(socket.gethostname().encode())
    room = limit - RECORD_OVERHEAD - key
    if room < MIN_BATCH_BYTES:
        return [
            f"kafka.properties.message.max.bytes: {limit} leaves {room} bytes for a batch "
            f"(at least {MIN_BATCH_BYTES + RECORD_OVERHEAD + key} for batches of {MIN_BATCH_BYTES})"
        ]
    return []


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def load(path: str | Path) -> AgentConfig:
    """Read and validate a TOML file (a missing file is an error: the operator named it)."""
    return validate(read_toml(path), str(path))
