"""The `[handoff]` section of the collector's (and the all-in-one's) TOML: where billable items
go, exactly once in effect (collector/outbox_relay.py).

    [handoff]
    topic = "kvmeter.billable"          # a Kafka topic of billable items, keyed by account
    # bootstrap = "kafka1:9092"         # default: [kafka] bootstrap
    # kafka_options = { "security.protocol" = "SASL_SSL" }   # librdkafka producer properties
    #                                   (enable.idempotence=true and acks=all always: not here)
    webhook_url = "https://billing.example.com/kvmeter/items"   # POST, one item per request
    webhook_headers = { Authorization = "Bearer ..." }          # sent with every POST
    # webhook_secret_file = "handoff.secret"   # or webhook_secret: X-Kvmeter-Signature HMAC
    timeout_seconds = 10                # one POST (in all, however slow the answer), one Kafka flush
    retry_attempts = 5                  # per round; then the item waits for the next round
    retry_initial_seconds = 1           # exponential backoff between attempts ...
    retry_max_seconds = 60              # ... up to this
    refused_retry_initial_seconds = 60  # an item the webhook refused (a 4xx about it) waits this
    refused_retry_max_seconds = 3600    # long to be offered again, twice as long after each next
                                        # refusal, up to this (0: every round)
    batch_size = 200                    # items a relay claims at a time
    poll_seconds = 1                    # idle wait between rounds
    lease_seconds = 30                  # a relay's hold on its round's items, renewed while it runs

A relay killed in the middle of a round (kill -9, a crash) leaves its items to the others, or to
itself restarted, once its lease lapses (at most lease_seconds); they are sent again then. A
running round renews its lease every third of it, however long its retries take; a relay that
cannot reach the store for a whole lease may see another replica send some of its items too:
harmless, the ids are the same.

No section: no outbox is filled and nothing is handed off (/v1/usage and /v1/adjustments still
list everything, with transaction ids).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmeter.tomlconfig import KAFKA_TOPIC, url_userinfo_problems

_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP token
_SECONDS = ("retry_initial", "retry_max", "refused_retry_initial", "refused_retry_max")  # key_seconds
RESERVED_HEADERS = {"content-type", "content-length", "host", "idempotency-key", "x-kvmeter-signature"}

HANDOFF_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "topic": KAFKA_TOPIC,
        "bootstrap": {"type": "string", "minLength": 1},
        "kafka_options": {
            "type": "object",
            "additionalProperties": {"type": ["string", "integer", "boolean"]},
        },
        "webhook_url": {"type": "string", "pattern": "^https?://[^\\s/]+"},
        "webhook_headers": {"type": "object", "additionalProperties": {"type": "string"}},
        "webhook_secret": {"type": "string", "minLength": 1},
        "webhook_secret_file": {"type": "string", "minLength": 1},
        "timeout_seconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 600},
        "retry_attempts": {"type": "integer", "minimum": 1, "maximum": 100},
        "retry_initial_seconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
        "retry_max_seconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
        "refused_retry_initial_seconds": {"type": "number", "minimum": 0, "maximum": 86400},
        "refused_retry_max_seconds": {"type": "number", "minimum": 0, "maximum": 86400},
        "batch_size": {"type": "integer", "minimum": 1, "maximum": 10000},
        "poll_seconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
        "lease_seconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 86400},
    },
}


@dataclass(frozen=True)
class HandoffConfig:
    topic: str = ""  # empty: no Kafka sink
    bootstrap: str = ""
    kafka_options: dict[str, Any] = field(default_factory=dict)
    webhook_url: str = ""  # empty: no webhook sink
    webhook_headers: dict[str, str] = field(default_factory=dict)
    webhook_secret: str = ""
    timeout_s: float = 10.0
    retry_attempts: int = 5
    retry_initial_s: float = 1.0
    retry_max_s: float = 60.0
    refused_retry_initial_s: float = 60.0
    refused_retry_max_s: float = 3600.0
    batch_size: int = 200
    poll_s: float = 1.0

    lease_s: float = 30.0

    @property
    def lease_ms(self) -> int:
        return int(self.lease_s * 1000)

    @property
    def refused_pause_ms(self) -> tuple[int, int]:
        """(first, longest) pause before a refused item is offered again (store/outbox.py)."""
        return int(self.refused_retry_initial_s * 1000), int(self.refused_retry_max_s * 1000)


def handoff_config(
    section: Any, kafka_bootstrap: str, base: Path | None, problems: list[str]
) -> HandoffConfig | None:
    """The section as a HandoffConfig (None when absent); problems are appended to `problems`
    (the schema has already reported shapes)."""
    if not isinstance(section, dict):
        return None
    topic, url = section.get("topic", ""), section.get("webhook_url", "")
    if not topic and not url:
        problems.append("handoff: name a topic, a webhook_url or both")
    problems += url_userinfo_problems(url, "handoff.webhook_url")
    bootstrap = section.get("bootstrap", kafka_bootstrap)
    if topic and not bootstrap:
        problems.append("handoff.topic: needs a broker: handoff.bootstrap or kafka.bootstrap")
    headers = section.get("webhook_headers", {})
    if isinstance(headers, dict):
        for name, value in headers.items():
            if not _HEADER_NAME.match(name) or name.lower() in RESERVED_HEADERS:
                problems.append(f"handoff.webhook_headers: {name!r} is not a header name kvmeter may set")
            elif not isinstance(value, str) or any(c in value for c in "\r\n\0"):
                problems.append(f"handoff.webhook_headers.{name}: a value on one line")
    secret, secret_file = section.get("webhook_secret", ""), section.get("webhook_secret_file", "")
    if secret and secret_file:
        problems.append("handoff: webhook_secret and webhook_secret_file exclude each other")
    elif isinstance(secret_file, str) and secret_file:
        try:
            secret = (Path(secret_file) if base is None else base / secret_file).read_text().strip()
        except OSError as exc:
            problems.append(f"handoff.webhook_secret_file: cannot read {secret_file}: {exc.strerror}")
    if (secret or headers) and not url:
        problems.append("handoff: webhook_headers and webhook_secret need a webhook_url")
    seconds = {key: section.get(f"{key}_seconds", getattr(HandoffConfig, f"{key}_s")) for key in _SECONDS}
    for low, high in (("retry_initial", "retry_max"), ("refused_retry_initial", "refused_retry_max")):
        first, most = seconds[low], seconds[high]
        if isinstance(first, (int, float)) and isinstance(most, (int, float)) and most < first:
            problems.append(f"handoff: {high}_seconds must be at least {low}_seconds")
    timeout = section.get("timeout_seconds", HandoffConfig.timeout_s)
    lease = section.get("lease_seconds", HandoffConfig.lease_s)
    if isinstance(timeout, (int, float)) and isinstance(lease, (int, float)) and lease <= timeout:
        problems.append("handoff: lease_seconds must be longer than timeout_seconds")
    if problems:
        return None
    return HandoffConfig(
        topic=topic,
        bootstrap=bootstrap if topic else "",
        kafka_options=dict(section.get("kafka_options", {})),
        webhook_url=url,
        webhook_headers=dict(headers),
        webhook_secret=secret,
        timeout_s=float(timeout),
        lease_s=float(lease),
        retry_attempts=int(section.get("retry_attempts", HandoffConfig.retry_attempts)),
        **{f"{key}_s": float(value) for key, value in seconds.items()},
        batch_size=int(section.get("batch_size", HandoffConfig.batch_size)),
        poll_s=float(section.get("poll_seconds", HandoffConfig.poll_s)),
    )
