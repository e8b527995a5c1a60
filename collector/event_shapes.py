"""The JSON shapes of CloudStack's event-bus payloads, declared as JSON Schemas and checked
before anything is read from a payload (reference cloudstack.md §1.4-1.6):

    check_shape(doc, category)   BadInput("wrong_type") naming the first field of a wrong type
    check_size(value, limit)     BadInput("oversized_event") for a value over `limit` bytes

What CloudStack sends: action, usage, resource-state and alert payloads are Java
`Map<String, String>`s serialised by Gson, so every value is a string (a null value is dropped by
Gson, but a null is accepted where CloudStack may put one: `zone`, `id`, `entityuuid`, ...);
async-job payloads are a `Map<String, Object>` whose `jobResult` and `cmdInfo` are objects
(escaped JSON strings before PR #5453). Only the keys kvmeter reads are declared: a key it does
not read never changes a bill, and an unknown key from a newer CloudStack is kept for audit.
"""

from __future__ import annotations

import re
from typing import Any

from jsonschema import Draft7Validator

from kvmeter.collector.errors import OVERSIZED_EVENT, WRONG_TYPE, BadInput
from kvmeter.proto import pb

DEFAULT_MAX_EVENT_BYTES = 1 << 20  # 1 MiB; Kafka's own default message limit is about the same

_TEXT = {"type": "string"}
_NULLABLE = {"type": ["string", "null"]}
# Keys a hand-made or newer payload may name an offering, address, MAC or network with.
_EXTRA_FIELDS = dict.fromkeys(
    (
        *("offering", "offeringid", "offeringId", "serviceofferingid", "serviceOfferingId"),
        *("ServiceOffering", "ipaddress", "ipAddress", "ip_address", "macaddress", "macAddress", "mac"),
        *("networkid", "networkId"),
    ),
    _NULLABLE,
)
# ActionEventUtils.publishOnEventBus: the first-class entities of the call by simple class name
# (VirtualMachine, IpAddress, Account, ...), each a uuid.
_ENTITIES = {"^[A-Z][A-Za-z]*$": _NULLABLE}

SCHEMAS: dict[int, dict[str, Any]] = {
    # UsageEventUtils.publishUsageEvent: zone is null for an unknown zone, id for an unknown uuid.
    pb.USAGE: {
        "type": "object",
        "properties": {
            **_EXTRA_FIELDS,
            "account": _TEXT,
            "zone": _NULLABLE,
            "event": _TEXT,
            "resource": _NULLABLE,
            "id": _NULLABLE,
            "eventDateTime": _TEXT,
        },
    },
    pb.ACTION: {
        "type": "object",
        "patternProperties": _ENTITIES,
        "properties": {
            **_EXTRA_FIELDS,
            "event": _TEXT,
            "status": _TEXT,
            "entity": _NULLABLE,
            "entityuuid": _NULLABLE,
            "account": _TEXT,
            "user": _TEXT,
            "project": _TEXT,
            "description": _NULLABLE,
            "eventDateTime": _TEXT,
        },
    },
    # UserVmStateListener / NetworkStateListener / ...: resource, id, old-state, new-state.
    pb.RESOURCE_STATE: {
        "type": "object",
        "properties": {
            "resource": _NULLABLE,
            "id": _NULLABLE,
            "old-state": _NULLABLE,
            "new-state": _NULLABLE,
            "status": _NULLABLE,
            "event": _NULLABLE,
            "eventDateTime": _TEXT,
        },
    },
    # AsyncJobManagerImpl.publishOnEventBus.
    pb.ASYNC_JOB: {
        "type": "object",
        "properties": {
            "command": _NULLABLE,
            "user": _NULLABLE,
            "account": _TEXT,
            "instanceUuid": _NULLABLE,
            "instanceType": _NULLABLE,
            "commandEventType": _NULLABLE,
            "jobId": _NULLABLE,
            "status": _NULLABLE,
            "jobResult": {"type": ["object", "string", "null"]},
            "cmdInfo": {"type": ["object", "string", "null"]},
            "eventDateTime": _TEXT,
        },
    },
    # AlertManagerImpl.publishOnEventBus: alertType and ids as strings.
    pb.EVENT_CATEGORY_UNKNOWN: {
        "type": "object",
        "properties": {"alertType": _TEXT, "subject": _NULLABLE, "eventDateTime": _TEXT},
    },
}
_JSON_TYPES: dict[type, str] = {
    dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number",
    type(None): "null",
}  # fmt: skip
_PY_TYPES: dict[str, set[type]] = {
    "object": {dict}, "array": {list}, "string": {str}, "boolean": {bool}, "integer": {int},
    "number": {int, float}, "null": {type(None)},
}  # fmt: skip
Rule = tuple[frozenset[type], str]  # the Python types a JSON type allows, and its name


def _rule(prop: dict[str, Any]) -> Rule:
    names = prop["type"] if isinstance(prop["type"], list) else [prop["type"]]
    return frozenset(t for n in names for t in _PY_TYPES[n]), " or ".join(names)


def _compile(schema: dict[str, Any]) -> tuple[dict[str, Rule], list[tuple[re.Pattern[str], Rule]]]:
    """The schema as {key: rule} and [(key pattern, rule)]: the same verdicts as jsonschema's
    validator (a test holds them together) at a tenth of its cost, for the keywords used here."""
    Draft7Validator.check_schema(schema)
    used = {k for k in schema if k != "type"} | {k for p in schema["properties"].values() for k in p}
    if used - {"properties", "patternProperties", "type"}:
        raise ValueError(f"event_shapes only compiles type checks, not {sorted(used)}")
    return (
        {key: _rule(prop) for key, prop in schema["properties"].items()},
        [(re.compile(pat), _rule(prop)) for pat, prop in schema.get("patternProperties", {}).items()],
    )


_COMPILED = {category: _compile(schema) for category, schema in SCHEMAS.items()}


def check_size(value: bytes, limit: int) -> None:
    if len(value) > limit:
        raise BadInput(OVERSIZED_EVENT, f"event of {len(value)} bytes is over the limit of {limit} bytes")


def check_shape(doc: dict[str, Any], category: int) -> None:
    """BadInput("wrong_type") naming the first field (by name) of a JSON type CloudStack never
    sends there."""
    fields, patterns = _COMPILED[category]
    wrong: list[tuple[str, str]] = []
    for key, value in doc.items():
        rules = [fields[key]] if key in fields else []
        rules += [rule for pattern, rule in patterns if pattern.search(key)]
        wrong += [(key, expected) for allowed, expected in rules if type(value) not in allowed]
    if wrong:
        key, expected = min(wrong)
        got = _JSON_TYPES.get(type(doc[key]), type(doc[key]).__name__)
        raise BadInput(WRONG_TYPE, f"{key} is a JSON {got}; CloudStack sends {expected} there")
