"""Measure batches -> Measure values: kvmeter's full message, the legacy five fields, rejections."""

from __future__ import annotations

import ipaddress

import pytest

from kvmeter.collector import errors
from kvmeter.collector.decode import LEGACY_TRAFFIC_TYPE, decode_batch
from kvmeter.collector.errors import BadInput
from kvmeter.proto import SCHEMA_VERSION, pb
from tests.proto import legacy_ipmeasure_pb2 as legacy

T0 = 1_715_680_800_000  # 2024-05-14T10:00:00Z
VM_UUID = "6f1c6c4e-0000-4000-8000-000000000001"
VR_UUID = "6f1c6c4e-0000-4000-8000-0000000000r5"


def batch(**fields: object) -> pb.MeasureBatch:
    b = pb.MeasureBatch(schema=SCHEMA_VERSION, host_id="kvm-01", boot_id="boot-1", stream_id="s-1", seq=7)
    b.poll_time = T0 + 60_000
    for name, value in fields.items():
        setattr(b, name, value)
    return b


def full_batch() -> pb.MeasureBatch:
    b = batch(final=True)
    b.measures.add(
        header=SCHEMA_VERSION, saddr=0, bytes=1500, start=T0, end=T0 + 10_000, direction=pb.VM_TX, packets=3,
        address=ipaddress.IPv4Address("10.1.1.5").packed, traffic_type=pb.GUEST, device="vnet3",
        mac="02:00:3A:00:00:01", instance_uuid=VM_UUID, domain_name="i-2-10-VM",
    )  # fmt: skip
    b.measures.add(
        header=SCHEMA_VERSION, saddr=0, bytes=900, start=T0, end=T0 + 10_000, direction=pb.VM_RX,
        address=ipaddress.IPv6Address("2001:db8::5").packed, traffic_type=pb.PUBLIC, device="vnet9",
        domain_name="r-5-VM", final_at_delete=True,
    )  # fmt: skip
    b.measures.add(
        header=SCHEMA_VERSION, saddr=0, bytes=10**12, start=T0, end=T0 + 10_000, direction=pb.VM_RX,
        address=bytes(16), traffic_type=pb.CONTROL, quarantined=True, quarantine_reason="jump",
    )  # fmt: skip
    vm = b.inventory.add(uuid=VM_UUID, name="i-2-10-VM", kind=pb.USER_VM)
    vm.owner["ownerAccountUuid"] = "acct-vm"
    vr = b.inventory.add(uuid=VR_UUID, name="r-5-VM", kind=pb.VIRTUAL_ROUTER)
    vr.owner["ownerAccountUuid"] = "acct-net"
    return b


def test_full_batch() -> None:
    out = decode_batch(full_batch().SerializeToString())
    assert (out.stream_id, out.seq, out.host_id, out.boot_id) == ("s-1", 7, "kvm-01", "boot-1")
    assert (out.poll_time_ms, out.final) == (T0 + 60_000, True)
    assert [d.name for d in out.inventory] == ["i-2-10-VM", "r-5-VM"]
    vm, vr, odd = out.measures
    assert (vm.index, vm.direction, vm.traffic_type, vm.bytes, vm.packets) == (0, "sent", "guest", 1500, 3)
    assert (vm.address, vm.mac, vm.device, vm.instance_uuid) == (
        "10.1.1.5",
        "02:00:3a:00:00:01",
        "vnet3",
        VM_UUID,
    )
    assert (vm.start_ms, vm.end_ms, vm.stream_id, vm.seq, vm.host_id) == (T0, T0 + 10_000, "s-1", 7, "kvm-01")
    assert vm.owner_hint == {"ownerAccountUuid": "acct-vm"}
    assert (vr.index, vr.direction, vr.traffic_type, vr.address) == (1, "received", "public", "2001:db8::5")
    assert vr.owner_hint == {"ownerAccountUuid": "acct-net"}  # matched by domain name
    assert vr.final_at_delete
    assert (odd.address, odd.quarantine_reason, odd.traffic_type, odd.owner_hint) == (
        "",
        "jump",
        "control",
        {},
    )


def test_quarantine_without_a_reason_still_says_quarantined() -> None:
    b = batch()
    b.measures.add(header=2, saddr=0, bytes=5, start=T0, end=T0 + 1, direction=pb.VM_TX, quarantined=True)
    assert decode_batch(b.SerializeToString()).measures[0].quarantine_reason == "quarantined"


def test_legacy_five_field_measure_bills_by_saddr() -> None:
    old = legacy.IPMeasure(
        header=1, saddr=int(ipaddress.IPv4Address("203.0.113.7")), bytes=4096, start=T0, end=T0 + 60_000
    )
    b = batch()
    b.measures.add().MergeFromString(old.SerializeToString())
    (m,) = decode_batch(b.SerializeToString()).measures
    assert (m.address, m.bytes, m.start_ms, m.end_ms) == ("203.0.113.7", 4096, T0, T0 + 60_000)
    assert (m.direction, m.traffic_type) == ("sent", LEGACY_TRAFFIC_TYPE)
    assert (m.instance_uuid, m.mac, m.domain_name, m.owner_hint) == ("", "", "", {})


def test_unknown_traffic_type_decodes_as_empty() -> None:
    b = batch()
    b.measures.add(
        header=2, saddr=0, bytes=5, start=T0, end=T0, direction=pb.VM_RX, traffic_type=pb.TRAFFIC_UNKNOWN
    )
    (m,) = decode_batch(b.SerializeToString()).measures
    assert (m.traffic_type, m.direction, m.start_ms, m.end_ms) == ("", "received", T0, T0)


def test_empty_batch_is_valid() -> None:
    out = decode_batch(batch().SerializeToString())
    assert (out.measures, out.inventory, out.final) == ([], [], False)


def _with_measure(**fields: object) -> bytes:
    b = batch()
    m = b.measures.add(header=2, saddr=0, bytes=1, direction=pb.VM_TX)
    for name, value in fields.items():
        setattr(m, name, value)
    return b.SerializeToString()


REJECTED = [
    (b"\xff\xff\xff\xff", errors.MALFORMED_PROTOBUF),
    (b"\x0a\x05ab", errors.MALFORMED_PROTOBUF),  # truncated length-delimited field
    (batch(stream_id="").SerializeToString(), errors.MISSING_STREAM),
    (b"", errors.MISSING_STREAM),
    (batch(seq=0).SerializeToString(), errors.MISSING_SEQ),
    (_with_measure(start=T0), errors.MISSING_INTERVAL),
    (_with_measure(end=T0), errors.MISSING_INTERVAL),
    (_with_measure(start=T0 + 1, end=T0), errors.INVERTED_INTERVAL),
    (_with_measure(start=0, end=10), errors.IMPLAUSIBLE_INTERVAL),
    (_with_measure(start=T0, end=T0 + 40 * 86_400_000), errors.IMPLAUSIBLE_INTERVAL),
    (_with_measure(start=T0, end=7_258_118_400_001), errors.IMPLAUSIBLE_INTERVAL),
    (_with_measure(start=T0, end=T0 + 1, address=b"\x01\x02\x03"), errors.BAD_ADDRESS),
]


@pytest.mark.parametrize(("value", "reason"), REJECTED)
def test_rejections(value: bytes, reason: str) -> None:
    with pytest.raises(BadInput) as info:
        decode_batch(value)
    assert info.value.reason == reason


def test_measures_with_equal_billing_fields_share_one_target_and_keep_their_own_values() -> None:
    b = batch()
    for n, direction in enumerate((pb.VM_TX, pb.VM_TX, pb.VM_RX)):
        b.measures.add(
            header=2, saddr=0, bytes=10 + n, packets=n, start=T0 + n, end=T0 + 10_000, direction=direction,
            traffic_type=pb.PUBLIC, instance_uuid=VM_UUID, domain_name="i-2-10-VM",
            mac=f"02:00:00:00:00:0{n}", device=f"vnet{n}", final_at_delete=n == 1,
        )  # fmt: skip
    for saddr in (int(ipaddress.IPv4Address("203.0.113.7")), int(ipaddress.IPv4Address("203.0.113.8"))):
        b.measures.add(header=1, saddr=saddr, bytes=1, start=T0, end=T0 + 1)  # the original five fields
    out = decode_batch(b.SerializeToString())
    sent, again, received, legacy_7, legacy_8 = out.targets
    assert sent is again
    assert received is not sent
    assert legacy_7 is not legacy_8
    assert (received.direction, legacy_7.address, legacy_8.address) == (
        "received",
        "203.0.113.7",
        "203.0.113.8",
    )
    assert [
        (m.bytes, m.packets, m.start_ms, m.mac, m.device, m.final_at_delete) for m in out.measures[:3]
    ] == [
        (10, 0, T0, "02:00:00:00:00:00", "vnet0", False),
        (11, 1, T0 + 1, "02:00:00:00:00:01", "vnet1", True),
        (12, 2, T0 + 2, "02:00:00:00:00:02", "vnet2", False),
    ]
