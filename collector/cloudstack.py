"""Parse one record of CloudStack's event bus (Kafka: key = resource uuid, value = bare JSON).

    parse_event(value: bytes, key: bytes | None = None, max_bytes: int = 1 MiB) -> pb.LifecycleEvent
    parse_time(text: str) -> int     # "yyyy-MM-dd HH:mm:ss Z" (any offset) -> ms since epoch, UTC
    event_id(value: bytes) -> str    # stable digest of the raw value
    key_to_keep(key, ev) / kept_key(kept, resource_uuid)   # the record key stored, and back

The record carries no category, so it is classified by the keys present (reference §1.6):
  old-state / new-state            -> RESOURCE_STATE
  jobId / commandEventType         -> ASYNC_JOB
  status + event (+ entity / user) -> ACTION   (the 4.5-era form has no `entity`)
  event + resource + id, no status -> USAGE    (`zone` may be absent: Gson drops nulls)
  alertType                        -> EVENT_CATEGORY_UNKNOWN with event_type "ALERT.<type>"
     (AlertEvent: a known category the wire contract has no value for; valid, never metered)
Anything else raises BadInput("unknown_event"); the adapter dead-letters it. Before anything is
read, a value over `max_bytes` is BadInput("oversized_event") and a payload with a field of a JSON
type CloudStack never sends there (account as a number, resource as an object) is
BadInput("wrong_type"): the shapes are declared in event_shapes.

Decisions:
- An unknown event *type* in a known category (e.g. usage VOLUME.CREATE, action ACCOUNT.DELETE)
  is a valid event: it is returned and the lifecycle state machine ignores it (kept for audit).
- Both forms of resource type are accepted: ≤4.17 Java class names (com.cloud.vm.VirtualMachine,
  com.cloud.network.dao.IPAddressVO) and ≥4.18 names (VirtualMachine, IpAddress) normalise to
  the same short name.
- Usage events carry the owner (account_is_owner=True); action and async-job events carry the
  caller (account_is_owner=False); resource-state events carry no account.
- A timestamp is required for usage, action and resource-state events. Async-job payloads may
  lack `eventDateTime`; then `time` stays unset (they are audit-only for the state machine).
- Async-job results (jobResult) give what the bus otherwise lacks: an IP resource's address,
  a VM's NIC MACs / IPs (first NIC in mac / ip_address, all in attributes nic.N.*) and a VM's
  service offering (offering_uuid; cpunumber / memory in attributes, and a custom offering's
  VM details as details.cpuNumber / details.memory) and whether the VM is displayed to its owner
  (displayvm, "true" / "false").
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from typing import Any

from kvmeter.collector.errors import (
    BAD_TIMESTAMP,
    MALFORMED_JSON,
    MISSING_RESOURCE,
    NOT_AN_OBJECT,
    UNKNOWN_EVENT,
    BadInput,
)
from kvmeter.collector.event_shapes import DEFAULT_MAX_EVENT_BYTES, check_shape, check_size
from kvmeter.proto import pb

MIN_YEAR = 2000
MAX_YEAR = 2200
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_TIME_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,3}))?\s*(?:([+-])(\d{2}):?(\d{2})|Z)$"
)
# Short names of the entity classes CloudStack uses, so both forms end up the same.
_RESOURCE_ALIASES = {
    "IPAddressVO": "IpAddress",
    "IPAddress": "IpAddress",
    "IpAddressVO": "IpAddress",
    "UserVmVO": "VirtualMachine",
    "UserVm": "VirtualMachine",
    "VMInstanceVO": "VirtualMachine",
}
_OFFERING_KEYS = ("offering", "offeringid", "offeringId", "serviceofferingid", "serviceOfferingId")
_IP_KEYS = ("ipaddress", "ipAddress", "ip_address")
_MAC_KEYS = ("macaddress", "macAddress", "mac")
# Keys consumed into dedicated fields; everything else scalar goes to attributes.
_CONSUMED = frozenset(
    {"event", "status", "entity", "entityuuid", "account", "zone", "resource", "id", "eventDateTime"}
    | {"instanceUuid", "instanceType", "commandEventType", "jobResult", "cmdInfo"}
)


def event_id(value: bytes) -> str:
    """A stable digest of the raw value: identical duplicates get identical ids."""
    return hashlib.sha256(value).hexdigest()


def key_to_keep(key: bytes | None, ev: pb.LifecycleEvent) -> bytes | None:
    """What of a record's key must be stored to parse its value again to the same event: None
    when the key is absent or is the resource uuid (what the event bus keys by)."""
    if not key or key.decode("utf-8", "replace") == ev.resource_uuid:
        return None
    return key


def kept_key(kept: bytes | None, resource_uuid: str) -> bytes | None:
    """The key to parse a stored value with, from what key_to_keep kept."""
    if kept is not None:
        return kept
    return resource_uuid.encode() if resource_uuid else None


def parse_time(text: str) -> int:
    """`yyyy-MM-dd HH:mm:ss Z` with any offset (+0530, -0800, +05:30, Z) -> ms since epoch, UTC.

    Raises BadInput("bad_timestamp") for other shapes, impossible dates, offsets beyond ±14:00
    and years outside [2000, 2200].
    """
    m = _TIME_RE.match(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise BadInput(BAD_TIMESTAMP, f"timestamp {text!r} is not 'yyyy-MM-dd HH:mm:ss Z'")
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    millis = int((m.group(7) or "0").ljust(3, "0"))
    sign, off_h, off_m = m.group(8), int(m.group(9) or 0), int(m.group(10) or 0)
    if off_h > 14 or off_m > 59 or (off_h == 14 and off_m):
        raise BadInput(BAD_TIMESTAMP, f"timestamp {text!r} has an impossible UTC offset")
    if not MIN_YEAR <= year <= MAX_YEAR:
        raise BadInput(BAD_TIMESTAMP, f"timestamp {text!r} is outside years {MIN_YEAR}-{MAX_YEAR}")
    offset = dt.timedelta(hours=off_h, minutes=off_m) * (-1 if sign == "-" else 1)
    try:
        when = dt.datetime(year, month, day, hour, minute, second, tzinfo=dt.timezone(offset))
    except ValueError as exc:
        raise BadInput(BAD_TIMESTAMP, f"timestamp {text!r} is not a real date: {exc}") from None
    return (when - _EPOCH) // dt.timedelta(milliseconds=1) + millis


def resource_type_name(raw: str) -> str:
    """VirtualMachine / IpAddress / ... from either a Java class name or a ≥4.18 type name."""
    short = raw.rsplit(".", 1)[-1]
    return _RESOURCE_ALIASES.get(short, short)


def parse_event(
    value: bytes, key: bytes | None = None, max_bytes: int = DEFAULT_MAX_EVENT_BYTES
) -> pb.LifecycleEvent:
    """One Kafka record of the event bus -> a normalised LifecycleEvent (see module doc)."""
    check_size(value, max_bytes)
    try:
        doc = json.loads(value)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadInput(MALFORMED_JSON, f"event is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadInput(NOT_AN_OBJECT, f"event JSON is a {type(doc).__name__}, not an object")
    try:
        return _parse_doc(doc, value, key)
    except UnicodeEncodeError as exc:  # a lone surrogate escape (\\ud800): valid JSON, not text
        raise BadInput(MALFORMED_JSON, f"event has a string that is not Unicode text: {exc}") from None


def _parse_doc(doc: dict[str, Any], value: bytes, key: bytes | None) -> pb.LifecycleEvent:
    category = classify(doc)
    check_shape(doc, category)
    ev = pb.LifecycleEvent(event_id=event_id(value), category=category)
    key_text = key.decode("utf-8", "replace") if key else ""
    if category == pb.EVENT_CATEGORY_UNKNOWN:  # an alert: valid, about no resource we meter
        ev.event_type = "ALERT." + _text(doc.get("alertType"))
    elif category == pb.RESOURCE_STATE:
        _fill_state(ev, doc)
    elif category == pb.ASYNC_JOB:
        _fill_async(ev, doc)
    else:
        _fill_usage_or_action(ev, doc, category)
    if not ev.resource_uuid and key_text:
        ev.resource_uuid = key_text
    elif key_text and key_text != ev.resource_uuid:
        ev.attributes["kafka_key"] = key_text
    if category in (pb.USAGE, pb.RESOURCE_STATE) and not ev.resource_uuid:
        raise BadInput(MISSING_RESOURCE, f"{_text(doc.get('event')) or 'state'} event names no resource")
    when = doc.get("eventDateTime")
    if when is not None or category != pb.ASYNC_JOB:
        if not isinstance(when, str):
            raise BadInput(BAD_TIMESTAMP, "event has no eventDateTime")
        ev.time = parse_time(when)
    for name, item in doc.items():
        if name not in _CONSUMED and name not in ev.attributes:
            text = _scalar(item)
            if text is not None:
                ev.attributes[name] = text
    return ev


def classify(doc: dict[str, Any]) -> pb.EventCategory:
    """The EventCategory of a payload, by the keys present; BadInput("unknown_event") if none."""
    if "old-state" in doc or "new-state" in doc:
        return pb.RESOURCE_STATE
    if "jobId" in doc or "commandEventType" in doc:
        return pb.ASYNC_JOB
    if "alertType" in doc:
        return pb.EVENT_CATEGORY_UNKNOWN
    if doc.get("event") not in (None, ""):  # a wrong type here is the shape check's to name
        if "status" in doc and ("entity" in doc or "user" in doc):
            return pb.ACTION
        if "status" not in doc and "resource" in doc and "id" in doc:
            return pb.USAGE
    raise BadInput(UNKNOWN_EVENT, f"no known event category has the keys {sorted(doc)[:12]}")


def _fill_usage_or_action(ev: pb.LifecycleEvent, doc: dict[str, Any], category: pb.EventCategory) -> None:
    ev.event_type = _text(doc.get("event"))
    ev.account_uuid = _text(doc.get("account"))
    ev.zone_uuid = _text(doc.get("zone"))
    if category == pb.USAGE:
        ev.account_is_owner = True
        ev.resource_type = resource_type_name(_text(doc.get("resource")))
        ev.resource_uuid = _text(doc.get("id"))
    else:
        ev.account_is_owner = False
        ev.status = _text(doc.get("status"))
        ev.resource_type = resource_type_name(_text(doc.get("entity")))
        # ≥4.18 names the entity's uuid; older payloads only carry first-class entities by name.
        ev.resource_uuid = _text(doc.get("entityuuid")) or _text(doc.get(ev.resource_type))
    ev.offering_uuid = _first(doc, _OFFERING_KEYS) or _text(doc.get("ServiceOffering"))
    ev.ip_address = _first(doc, _IP_KEYS)
    ev.mac = _first(doc, _MAC_KEYS).lower()
    ev.network_uuid = _first(doc, ("networkid", "networkId"))


def _fill_state(ev: pb.LifecycleEvent, doc: dict[str, Any]) -> None:
    # The bus payload has no event name (VirtualMachine.Event lives outside the JSON); a newer
    # or hand-made payload may carry one in `event`.
    ev.event_type = _text(doc.get("event")) or "StateTransition"
    ev.resource_type = resource_type_name(_text(doc.get("resource")))
    ev.resource_uuid = _text(doc.get("id"))
    ev.status = _text(doc.get("status"))


def _fill_async(ev: pb.LifecycleEvent, doc: dict[str, Any]) -> None:
    ev.event_type = _text(doc.get("commandEventType"))
    ev.status = _text(doc.get("status"))
    ev.account_uuid = _text(doc.get("account"))
    ev.account_is_owner = False
    ev.resource_type = resource_type_name(_text(doc.get("instanceType")))
    ev.resource_uuid = _text(doc.get("instanceUuid"))
    result = doc.get("jobResult")
    if isinstance(result, str):  # before PR #5453 an escaped JSON string
        try:
            result = json.loads(result)
        except (ValueError, RecursionError):
            result = None
    if isinstance(result, dict):
        _fill_from_job_result(ev, result)


def _fill_from_job_result(ev: pb.LifecycleEvent, result: dict[str, Any]) -> None:
    """Pick the address of an IP resource, or the NICs of a VM, out of an API response object."""
    for body in result.values():
        if not isinstance(body, dict):
            continue
        if ev.resource_type == "IpAddress" and _text(body.get("ipaddress")):
            ev.ip_address = _text(body.get("ipaddress"))
        if ev.resource_type == "VirtualMachine" and _text(body.get("serviceofferingid")):
            ev.offering_uuid = _text(body.get("serviceofferingid"))  # the VM as the job left it
            for name in ("cpunumber", "memory"):
                if _text(body.get(name)):
                    ev.attributes[name] = _text(body.get(name))
            if isinstance(body.get("displayvm"), bool):  # hidden from its owner: hidden_deploy.py
                ev.attributes["displayvm"] = _text(body.get("displayvm"))
            details = body.get("details")  # a custom offering's VM: its own cpuNumber / memory
            if isinstance(details, dict):
                for name in ("cpuNumber", "memory"):
                    if _text(details.get(name)):
                        ev.attributes[f"details.{name}"] = _text(details.get(name))
        nics = body.get("nic")
        if isinstance(nics, list):
            for i, nic in enumerate(n for n in nics if isinstance(n, dict)):
                mac, ip, net = (_text(nic.get(k)) for k in ("macaddress", "ipaddress", "networkid"))
                if i == 0:
                    ev.mac, ev.ip_address, ev.network_uuid = mac.lower(), ip, net
                for name, item in (("mac", mac.lower()), ("ip", ip), ("network", net)):
                    if item:
                        ev.attributes[f"nic.{i}.{name}"] = item


def _first(doc: dict[str, Any], keys: tuple[str, ...]) -> str:
    for k in keys:
        text = _text(doc.get(k))
        if text:
            return text
    return ""


def _text(item: Any) -> str:
    """A scalar as text; None, objects and lists as ""."""
    text = _scalar(item)
    return text if text is not None else ""


def _scalar(item: Any) -> str | None:
    if item is None or isinstance(item, (dict, list)):
        return None
    if isinstance(item, bool):
        return "true" if item else "false"
    return str(item)
