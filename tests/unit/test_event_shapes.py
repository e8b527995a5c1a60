"""CloudStack payloads are checked by JSON type and size before anything is read from them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft7Validator

from kvmeter.collector import errors
from kvmeter.collector.cloudstack import classify, parse_event
from kvmeter.collector.errors import BadInput
from kvmeter.collector.event_shapes import DEFAULT_MAX_EVENT_BYTES, SCHEMAS, check_shape
from kvmeter.proto import pb

DATA = Path(__file__).parent / "data" / "cloudstack"
WHEN = "2024-05-14 10:21:05 +0000"
USAGE = {"account": "acct-1", "zone": "zone-1", "event": "VM.START",
         "resource": "com.cloud.vm.VirtualMachine", "id": "9b1f0000-0000-4000-8000-0000000000vm",
         "eventDateTime": WHEN}  # fmt: skip
ACTION = {"status": "Completed", "event": "VM.START", "entity": "VirtualMachine", "entityuuid": "vm-1",
          "account": "acct-1", "user": "user-1", "VirtualMachine": "vm-1", "description": "done",
          "eventDateTime": WHEN}  # fmt: skip
STATE = {"resource": "VirtualMachine", "id": "vm-1", "old-state": "Running", "new-state": "Stopped",
         "status": "postStateTransitionEvent", "eventDateTime": WHEN}  # fmt: skip
ASYNC = {"command": "DeployVMCmd", "user": "user-1", "account": "acct-1", "instanceUuid": "vm-1",
         "instanceType": "VirtualMachine", "commandEventType": "VM.CREATE", "jobId": "job-1",
         "status": "SUCCEEDED", "jobResult": {"virtualmachine": {"id": "vm-1"}},
         "eventDateTime": WHEN}  # fmt: skip
ALERT = {"alertType": "7", "dataCenterId": "1", "podId": "1", "subject": "Host down", "body": "",
         "eventDateTime": WHEN}  # fmt: skip

# base payload, field, a value of a JSON type CloudStack never sends there
WRONG = [
    (USAGE, "account", 123), (USAGE, "account", {"id": "acct-1"}), (USAGE, "account", None),
    (USAGE, "account", True), (USAGE, "account", ["acct-1"]), (USAGE, "account", 1.5),
    (USAGE, "zone", 7), (USAGE, "zone", {}),
    (USAGE, "event", 42),
    (USAGE, "resource", {"type": "VirtualMachine"}), (USAGE, "resource", ["VirtualMachine"]),
    (USAGE, "id", 1234), (USAGE, "id", {"uuid": "vm-1"}),
    (USAGE, "eventDateTime", 1715680000), (USAGE, "eventDateTime", None),
    (USAGE, "offering", 3), (USAGE, "ipaddress", ["192.0.2.1"]), (USAGE, "mac", 2), (USAGE, "networkid", {}),
    (ACTION, "status", None), (ACTION, "status", 1), (ACTION, "entity", {"name": "VirtualMachine"}),
    (ACTION, "entityuuid", 5), (ACTION, "account", 123), (ACTION, "user", {}), (ACTION, "project", 9),
    (ACTION, "VirtualMachine", 17), (ACTION, "description", ["x"]), (ACTION, "event", ["VM.START"]),
    (STATE, "id", 17), (STATE, "resource", {}), (STATE, "old-state", 1), (STATE, "new-state", False),
    (STATE, "status", []),
    (ASYNC, "account", 123), (ASYNC, "instanceUuid", 5), (ASYNC, "instanceType", {}),
    (ASYNC, "commandEventType", 1), (ASYNC, "jobResult", [1]), (ASYNC, "cmdInfo", 3), (ASYNC, "status", 0),
    (ALERT, "alertType", 7), (ALERT, "subject", {}),
]  # fmt: skip


def _value(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


@pytest.mark.parametrize(("base", "field", "bad"), WRONG)
def test_a_field_of_the_wrong_json_type_is_rejected_by_name(
    base: dict[str, Any], field: str, bad: Any
) -> None:
    with pytest.raises(BadInput) as info:
        parse_event(_value({**base, field: bad}), b"vm-1")
    assert info.value.reason == errors.WRONG_TYPE
    assert info.value.message.startswith(f"{field} is a JSON ")


@pytest.mark.parametrize(("base", "field", "bad"), WRONG)
def test_the_fast_check_agrees_with_jsonschema(base: dict[str, Any], field: str, bad: Any) -> None:
    category = classify(base)
    doc = {**base, field: bad}
    assert not Draft7Validator(SCHEMAS[category]).is_valid(doc)
    with pytest.raises(BadInput):
        check_shape(doc, category)


def test_what_cloudstack_sends_is_accepted() -> None:
    # null zone (unknown zone) and null id / entityuuid are what UsageEventUtils and
    # ActionEventUtils put in the map; string ids are uuids
    for doc in (USAGE, {**USAGE, "zone": None}, ACTION, {**ACTION, "entityuuid": None}, STATE, ASYNC,
                {**ASYNC, "jobResult": '{"ipaddress": {}}', "cmdInfo": None}, ALERT):  # fmt: skip
        assert Draft7Validator(SCHEMAS[classify(doc)]).is_valid(doc)
        parse_event(_value(doc), b"vm-1")
    for path in sorted(DATA.glob("*.json")):
        record = json.loads(path.read_text())
        assert Draft7Validator(SCHEMAS[classify(record["value"])]).is_valid(record["value"]), path.name
        parse_event(_value(record["value"]), None if record["key"] is None else record["key"].encode())


def test_an_account_given_as_a_number_is_never_billed_to_its_digits() -> None:
    with pytest.raises(BadInput) as info:
        parse_event(_value({**USAGE, "account": 123}))
    assert info.value.reason == errors.WRONG_TYPE
    assert "CloudStack sends string" in info.value.message


def test_unknown_keys_of_any_type_are_kept_for_audit_not_checked() -> None:
    ev = parse_event(_value({**USAGE, "extra": 5, "nested": {"a": 1}}))
    assert ev.attributes["extra"] == "5"
    assert "nested" not in ev.attributes


def test_oversized_events_are_rejected_before_parsing() -> None:
    padding = "x" * 3000
    value = _value({**USAGE, "note": padding})
    assert parse_event(value, None, len(value)).account_uuid == "acct-1"  # the limit itself is allowed
    with pytest.raises(BadInput) as info:
        parse_event(value, None, len(value) - 1)
    assert info.value.reason == errors.OVERSIZED_EVENT
    assert str(len(value)) in info.value.message
    with pytest.raises(BadInput) as info:  # too big is said before malformed
        parse_event(b"{" * (DEFAULT_MAX_EVENT_BYTES + 1))
    assert info.value.reason == errors.OVERSIZED_EVENT
    assert DEFAULT_MAX_EVENT_BYTES == 1024 * 1024


def test_every_category_has_a_declared_shape() -> None:
    assert set(SCHEMAS) == {pb.USAGE, pb.ACTION, pb.RESOURCE_STATE, pb.ASYNC_JOB, pb.EVENT_CATEGORY_UNKNOWN}
