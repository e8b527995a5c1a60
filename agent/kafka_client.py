"""The librdkafka side of the agent's publishing: the producer's properties and construction, the
topic's size limit as the broker states it, and reading librdkafka's errors and statistics. No
state: the Publisher (publish.py) decides what to do with what these say."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any

from kvmeter.log_limit import limited_logger

log = logging.getLogger(__name__)
# librdkafka's own log lines and its error callbacks repeat at every reconnect attempt while the
# broker is away: one line per distinct message per minute, with a count of the rest.
KAFKA_LOG = limited_logger("kvmeter.agent.kafka", 60.0)

DEFAULT_PROPERTIES: dict[str, Any] = {
    "message.timeout.ms": 0,  # infinite: the spool, not librdkafka, decides what is given up
    # A broker away for long is retried ever less often (doubling from 0.2 s up to 30 s): its
    # return is noticed within 30 s, and an outage of hours costs next to nothing meanwhile.
    "reconnect.backoff.ms": 200,
    "reconnect.backoff.max.ms": 30000,
    # librdkafka >= 2.10 re-bootstraps while no broker answers, making and ending a broker
    # thread several times a second for as long as the outage lasts (a third of the agent's
    # CPU then); the agent keeps to the brokers it knows (its bootstrap list and the cluster's).
    "metadata.recovery.strategy": "none",
    "linger.ms": 20,
    "compression.type": "lz4",
    # Statistics (the idempotent producer's id and epoch) every 5 s: how a broker that lost the
    # producer's state is noticed (about 20 µs of JSON per report).
    "statistics.interval.ms": 5000,
}
FORCED_PROPERTIES: dict[str, Any] = {"enable.idempotence": True, "acks": "all"}
# Defaults that older librdkafka releases do not know (Debian's and Ubuntu's): left out there.
NEWER_PROPERTIES = ("metadata.recovery.strategy",)


def producer_config(bootstrap: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    config = {"bootstrap.servers": bootstrap, **DEFAULT_PROPERTIES, **dict(extra or {})}
    config.update(FORCED_PROPERTIES)
    return config


def confluent_producer(config: dict[str, Any], producer_class: Any = None) -> Any:
    """A Producer; a default property this librdkafka does not know yet is left out."""
    from confluent_kafka import KafkaException, Producer  # imported late: `--once` needs no Kafka

    make = producer_class or Producer
    try:
        return make(config)
    except KafkaException as exc:
        unknown = [name for name in NEWER_PROPERTIES if f'"{name}"' in str(exc) and name in config]
        if not unknown:
            raise
        log.info("librdkafka %s does not know %s: left out", _libversion(), ", ".join(unknown))
        return make({k: v for k, v in config.items() if k not in unknown})


def property_problems(bootstrap: str, properties: Mapping[str, Any] | None) -> list[str]:
    """What librdkafka refuses in `[kafka.properties]` (a property it does not know, a value it
    does not take, one that cannot go with the forced idempotence), found by making the producer
    once at start: the config error names it, where the daemon would otherwise die of a
    KafkaException with a traceback. Nothing is sent (the producer has no topic and is dropped)."""
    from confluent_kafka import KafkaException

    config = producer_config(bootstrap, properties)
    config["logger"] = KAFKA_LOG
    try:
        producer = confluent_producer(config)
    except KafkaException as exc:
        err = exc.args[0] if exc.args else exc
        text = err.str() if hasattr(err, "str") else str(err)
        return [f"kafka.properties: librdkafka refuses them: {text}"]
    except (TypeError, ValueError) as exc:
        return [f"kafka.properties: {exc}"]
    del producer
    return []


def topic_max_message_bytes(
    bootstrap: str, topic: str, properties: Mapping[str, Any] | None = None, timeout: float = 5.0
) -> int | None:
    """The topic's max.message.bytes as the broker states it (DescribeConfigs: the topic's own
    or the broker's default), the largest record batch it takes; None when it does not say
    within `timeout` (away, no such topic, not allowed to describe)."""
    from confluent_kafka.admin import AdminClient, ConfigResource

    config = {**dict(properties or {}), "bootstrap.servers": bootstrap, "logger": KAFKA_LOG}
    config["socket.timeout.ms"] = int(timeout * 1000)
    admin = AdminClient(config)
    try:
        futures = admin.describe_configs(
            [ConfigResource(ConfigResource.Type.TOPIC, topic)], request_timeout=timeout
        )
        for future in futures.values():
            entry = future.result(timeout).get("max.message.bytes")
            if entry is not None and entry.value is not None:
                return int(entry.value)
    except Exception as exc:  # a broker that does not answer leaves the configured limits
        log.info(
            "the size limit of topic %s is unknown (%s): batches keep to the configured limits", topic, exc
        )
    return None


def _libversion() -> str:
    from confluent_kafka import libversion

    return str(libversion()[0])


MSG_SIZE_TOO_LARGE = 10  # KafkaError.MSG_SIZE_TOO_LARGE (librdkafka's and the broker's code)
_FATAL = -150  # KafkaError._FATAL


def error_code(err: Any) -> int | None:
    code = getattr(err, "code", None)
    return code() if callable(code) else None


def is_fatal(err: Any) -> bool:
    """A KafkaError (or a KafkaException carrying one) that leaves the producer unusable."""
    if err is not None and not hasattr(err, "fatal") and getattr(err, "args", None):
        err = err.args[0]  # KafkaException(KafkaError)
    fatal = getattr(err, "fatal", None)
    return bool(fatal()) if callable(fatal) else error_code(err) == _FATAL


_EOS = re.compile(r'"eos":\s*')
_JSON = json.JSONDecoder()


def producer_identity(report: str) -> tuple[int, int] | None:
    """(producer id, epoch) from a statistics report: only its "eos" object is decoded."""
    at = _EOS.search(report)
    if at is None:
        return None
    try:
        eos, _ = _JSON.raw_decode(report, at.end())
        pid, epoch = int(eos["producer_id"]), int(eos["producer_epoch"])
    except (ValueError, KeyError, TypeError):
        return None
    return (pid, epoch) if pid >= 0 else None
