"""CloudStack event-bus records -> LifecycleEvent: both payload forms, classification, dates."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from kvmeter.collector import errors
from kvmeter.collector.cloudstack import kept_key, key_to_keep, parse_event, parse_time
from kvmeter.collector.errors import BadInput
from kvmeter.collector.lifecycle import build_history
from kvmeter.collector.model import OwnerChange, Segment
from kvmeter.proto import pb

DATA = Path(__file__).parent / "data" / "cloudstack"
VM = "9b1f0000-0000-4000-8000-0000000000vm"
IP = "41aa0000-0000-4000-8000-0000000000ip"
OWNER = "3c5e0000-0000-4000-8000-00000000acct"
ADMIN = "77770000-0000-4000-8000-0000000admin"


def utc_ms(*parts: int) -> int:
    return int(dt.datetime(*parts, tzinfo=dt.UTC).timestamp()) * 1000


def record(name: str) -> tuple[bytes, bytes | None]:
    doc = json.loads((DATA / name).read_text())
    key = doc["key"].encode() if doc["key"] is not None else None
    return json.dumps(doc["value"], separators=(",", ":")).encode(), key


# file, category, event type, resource type, resource uuid, account, account_is_owner, UTC time
CASES = [
    ("usage_vm_start.json", pb.USAGE, "VM.START", "VirtualMachine", VM, OWNER, True,
     utc_ms(2024, 5, 14, 10, 21, 5)),
    ("usage_vm_destroy_ist.json", pb.USAGE, "VM.DESTROY", "VirtualMachine", VM, OWNER, True,
     utc_ms(2024, 5, 15, 8, 30, 10)),
    ("usage_ip_assign_no_zone.json", pb.USAGE, "NET.IPASSIGN", "IpAddress", IP, OWNER, True,
     utc_ms(2024, 5, 14, 9, 0, 3)),
    ("action_vm_start_4_18.json", pb.ACTION, "VM.START", "VirtualMachine", VM, ADMIN, False,
     utc_ms(2024, 5, 14, 10, 21, 7)),
    ("action_vm_start_4_17.json", pb.ACTION, "VM.START", "VirtualMachine", VM, ADMIN, False,
     utc_ms(2022, 3, 2, 2, 51, 7)),
    ("action_ip_assign_4_17.json", pb.ACTION, "NET.IPASSIGN", "IpAddress", IP, OWNER, False,
     utc_ms(2022, 3, 1, 3, 15, 3)),
    ("action_account_delete_4_5.json", pb.ACTION, "ACCOUNT.DELETE", "", "",
     "bd730000-0000-4000-8000-0000000000bd", False, utc_ms(2015, 9, 4, 12, 29, 24)),
    ("state_power_off.json", pb.RESOURCE_STATE, "StateTransition", "VirtualMachine", VM, "", False,
     utc_ms(2024, 5, 14, 12, 0, 0)),
    ("async_deploy_complete.json", pb.ASYNC_JOB, "VM.CREATE", "VirtualMachine", VM, ADMIN, False,
     utc_ms(2024, 5, 14, 10, 20, 59)),
]  # fmt: skip


@pytest.mark.parametrize(("name", "category", "etype", "rtype", "uuid", "account", "owner", "time"), CASES)
def test_payload_forms(
    name: str, category: int, etype: str, rtype: str, uuid: str, account: str, owner: bool, time: int
) -> None:
    value, key = record(name)
    ev = parse_event(value, key)
    assert (ev.category, ev.event_type, ev.resource_type, ev.resource_uuid) == (category, etype, rtype, uuid)
    assert (ev.account_uuid, ev.account_is_owner, ev.time) == (account, owner, time)


def test_old_and_new_entity_forms_normalise_alike() -> None:
    old = parse_event(*record("action_vm_start_4_17.json"))
    new = parse_event(*record("action_vm_start_4_18.json"))
    assert old.resource_type == new.resource_type == "VirtualMachine"
    assert old.resource_uuid == new.resource_uuid == VM


def test_usage_event_keeps_zone_and_other_keys_for_audit() -> None:
    ev = parse_event(*record("usage_vm_start.json"))
    assert ev.zone_uuid == "8ad00000-0000-4000-8000-00000000zone"
    action = parse_event(*record("action_vm_start_4_18.json"))
    assert action.status == "Completed"
    assert action.attributes["user"] == "7d2a0000-0000-4000-8000-00000000user"
    assert action.attributes["description"].startswith("Successfully completed")


def test_resource_state_keeps_both_states() -> None:
    ev = parse_event(*record("state_power_off.json"))
    assert (ev.attributes["old-state"], ev.attributes["new-state"]) == ("Running", "Stopped")
    assert ev.status == "postStateTransitionEvent"


def test_async_job_result_gives_nics() -> None:
    ev = parse_event(*record("async_deploy_complete.json"))
    assert (ev.mac, ev.ip_address, ev.network_uuid) == ("02:00:3a:7b:00:01", "10.1.1.23", "net-guest")
    assert ev.attributes["nic.1.mac"] == "02:00:3a:7b:00:02"
    assert ev.attributes["nic.1.ip"] == "192.0.2.44"
    assert ev.status == "SUCCEEDED"


def test_async_job_with_escaped_result_and_no_date() -> None:
    ev = parse_event(*record("async_ip_assign_escaped.json"))
    assert ev.category == pb.ASYNC_JOB
    assert ev.ip_address == "203.0.113.5"
    assert not ev.HasField("time")


def test_key_fills_missing_resource_and_is_kept_when_different() -> None:
    value = b'{"status":"Completed","event":"VM.REBOOT","entity":"VirtualMachine","user":"u","account":"a",'
    value += b'"eventDateTime":"2024-01-01 00:00:00 +0000"}'
    assert parse_event(value, b"from-key").resource_uuid == "from-key"
    assert parse_event(value, None).resource_uuid == ""
    usage = record("usage_vm_start.json")[0]
    ev = parse_event(usage, b"other")
    assert ev.resource_uuid == VM
    assert ev.attributes["kafka_key"] == "other"


def test_unknown_type_in_known_category_is_valid() -> None:
    value = b'{"account":"a","zone":"z","event":"VOLUME.CREATE","resource":"com.cloud.storage.Volume",'
    value += b'"id":"vol-1","eventDateTime":"2024-01-01 00:00:00 +0000"}'
    ev = parse_event(value)
    assert (ev.category, ev.event_type, ev.resource_type) == (pb.USAGE, "VOLUME.CREATE", "Volume")


def test_alerts_are_valid_but_about_nothing_metered() -> None:
    # AlertManagerImpl's payload: alertType, ids, subject, body, eventDateTime
    value = b'{"alertType":"7","dataCenterId":"1","podId":"1","clusterId":"0","subject":"Host down",'
    value += b'"body":"","eventDateTime":"2024-05-14 10:21:05 +0200"}'
    ev = parse_event(value)
    assert (ev.category, ev.event_type, ev.resource_uuid) == (pb.EVENT_CATEGORY_UNKNOWN, "ALERT.7", "")
    assert ev.time == utc_ms(2024, 5, 14, 8, 21, 5)
    assert ev.attributes["subject"] == "Host down"


def test_event_id_is_a_digest_of_the_raw_value() -> None:
    value, key = record("usage_vm_start.json")
    assert parse_event(value, key).event_id == parse_event(value, None).event_id
    spaced = json.dumps(json.loads(value)).encode()  # same content, other bytes
    assert parse_event(spaced).event_id != parse_event(value).event_id
    other, _ = record("usage_vm_destroy_ist.json")
    assert parse_event(other).event_id != parse_event(value).event_id


# text, UTC (y, m, d, H, M, S, ms)
GOOD_TIMES = [
    ("2024-05-14 10:21:05 +0000", (2024, 5, 14, 10, 21, 5, 0)),
    ("2024-05-14 10:21:05 +0530", (2024, 5, 14, 4, 51, 5, 0)),
    ("2024-05-14 10:21:05 -0800", (2024, 5, 14, 18, 21, 5, 0)),
    ("2024-05-14 10:21:05 +0545", (2024, 5, 14, 4, 36, 5, 0)),
    ("2024-01-01 05:00:00 +1400", (2023, 12, 31, 15, 0, 0, 0)),
    ("2023-12-31 20:00:00 -1200", (2024, 1, 1, 8, 0, 0, 0)),
    ("2024-03-01 00:30:00 +05:30", (2024, 2, 29, 19, 0, 0, 0)),
    ("2024-05-14T10:21:05Z", (2024, 5, 14, 10, 21, 5, 0)),
    ("2024-05-14 10:21:05.25 +0000", (2024, 5, 14, 10, 21, 5, 250)),
    ("2000-01-01 00:00:00 +0000", (2000, 1, 1, 0, 0, 0, 0)),
]


@pytest.mark.parametrize(("text", "utc"), GOOD_TIMES)
def test_dates_with_any_offset(text: str, utc: tuple[int, ...]) -> None:
    assert parse_time(text) == utc_ms(*utc[:6]) + utc[6]


BAD_TIMES = [
    "2024-05-14 10:21:05",  # no offset
    "2024-05-14 10:21:05 +1500",  # beyond +14:00
    "2024-05-14 10:21:05 +0560",
    "2024-05-14 10:21:05 +1430",
    "1999-12-31 23:59:59 +0000",
    "2201-01-01 00:00:00 +0000",
    "2023-02-29 00:00:00 +0000",
    "2024-13-01 00:00:00 +0000",
    "2024-05-14 24:00:00 +0000",
    "14/05/2024 10:21:05 +0000",
    "",
]


@pytest.mark.parametrize("text", BAD_TIMES)
def test_impossible_dates_are_rejected(text: str) -> None:
    with pytest.raises(BadInput) as info:
        parse_time(text)
    assert info.value.reason == errors.BAD_TIMESTAMP


REJECTED = [
    (b'{"account":"a", "event":', errors.MALFORMED_JSON),
    (b"\xff\xfe not utf-8", errors.MALFORMED_JSON),
    (b"", errors.MALFORMED_JSON),
    (b"[" * 100_000 + b"]" * 100_000, errors.MALFORMED_JSON),  # too deep to parse
    (b'["VM.START"]', errors.NOT_AN_OBJECT),
    (b'"VM.START"', errors.NOT_AN_OBJECT),
    (b'{"hello":"world"}', errors.UNKNOWN_EVENT),
    (b'{"event":"VM.START","eventDateTime":"2024-01-01 00:00:00 +0000"}', errors.UNKNOWN_EVENT),
    (b'{"status":"Completed","event":"VM.START"}', errors.UNKNOWN_EVENT),
    (b'{"account":"a","event":"VM.START","resource":"VirtualMachine","id":"v"}', errors.BAD_TIMESTAMP),
    (b'{"account":"a","event":"VM.START","resource":"VirtualMachine","id":"v","eventDateTime":1715680000}',
     errors.WRONG_TYPE),
    (b'{"account":"a","event":"VM.START","resource":"VirtualMachine","id":"v",'
     b'"eventDateTime":"1970-01-01 00:00:00 +0000"}', errors.BAD_TIMESTAMP),
    (b'{"account":"a","event":"VM.START","resource":"VirtualMachine","id":null,'
     b'"eventDateTime":"2024-01-01 00:00:00 +0000"}', errors.MISSING_RESOURCE),
    (b'{"resource":"VirtualMachine","old-state":"Running","new-state":"Stopped",'
     b'"eventDateTime":"2024-01-01 00:00:00 +0000"}', errors.MISSING_RESOURCE),
    (b'{"resource":"VirtualMachine","id":"v","old-state":"Running","new-state":"Stopped"}',
     errors.BAD_TIMESTAMP),
]  # fmt: skip


@pytest.mark.parametrize(("value", "reason"), REJECTED)
def test_rejections_carry_a_reason(value: bytes, reason: str) -> None:
    with pytest.raises(BadInput) as info:
        parse_event(value, None)  # no key: a key would name the missing resource
    assert info.value.reason == reason
    assert info.value.message
    assert str(info.value).startswith(reason)


def test_bus_records_to_history() -> None:
    # what the lifecycle topic carries for one VM, in arrival order, with a duplicate delivery
    names = [
        "usage_vm_destroy_ist.json",
        "action_vm_start_4_18.json",
        "state_power_off.json",
        "usage_vm_start.json",
        "async_deploy_complete.json",
        "state_power_off.json",
    ]
    events = [parse_event(*record(n)) for n in names]
    history = build_history(events)[VM]
    assert history.owners == [OwnerChange(utc_ms(2024, 5, 14, 10, 21, 5), OWNER)]
    assert history.running == [Segment(utc_ms(2024, 5, 14, 10, 21, 5), utc_ms(2024, 5, 14, 12), "", OWNER)]
    assert history.allocated == []  # its VM.CREATE was never seen
    assert history.macs == ["02:00:3a:7b:00:01", "02:00:3a:7b:00:02"]
    assert len(history.applied) == 2  # the usage START and the power-off; the DESTROY found nothing open


@pytest.mark.parametrize("name", sorted(p.name for p in DATA.glob("*.json")))
@pytest.mark.parametrize("key", [None, b"", "resource", b"other-key", b"\xff\xfe"])
def test_the_key_kept_parses_the_value_to_the_same_event(name: str, key: bytes | str | None) -> None:
    value, own = record(name)
    given = own if key == "resource" else key
    assert not isinstance(given, str)
    ev = parse_event(value, given)
    kept = key_to_keep(given, ev)
    assert kept is None or kept == given
    assert parse_event(value, kept_key(kept, ev.resource_uuid)) == ev
    if given == own and own:  # the bus keys by resource uuid: nothing to keep
        assert kept is None
