"""The wire contract: the original five-field IPMeasure stays decodable both ways.

Runs under the newest protobuf 6.x and under Debian 12's runtime (3.21.12) via
`make test-proto-compat`.
"""

from __future__ import annotations

import ipaddress

import pytest

from kvmeter.proto import SCHEMA_VERSION, pb
from tests.proto import legacy_ipmeasure_pb2 as legacy

SADDR = int(ipaddress.IPv4Address("203.0.113.7"))


def test_legacy_bytes_decode_as_ipmeasure() -> None:
    raw = legacy.IPMeasure(header=1, saddr=SADDR, bytes=1500, start=1_700_000_000_000, end=1_700_000_060_000)
    m = pb.IPMeasure.FromString(raw.SerializeToString())
    assert (m.header, m.saddr, m.bytes, m.start, m.end) == (
        1,
        SADDR,
        1500,
        1_700_000_000_000,
        1_700_000_060_000,
    )
    # Nothing else was on the wire: the new fields are absent, not zero-filled guesses.
    assert not m.HasField("direction")
    assert not m.HasField("instance_uuid")
    assert ipaddress.IPv4Address(m.saddr) == ipaddress.IPv4Address("203.0.113.7")


def test_kvmeter_measure_parses_with_legacy_required_message() -> None:
    m = pb.IPMeasure(
        header=SCHEMA_VERSION,
        saddr=0,  # unknown address: still sent, because proto2 keeps explicit presence
        bytes=0,
        start=10,
        end=20,
        direction=pb.VM_TX,
        packets=3,
        address=bytes(16),
        traffic_type=pb.GUEST,
        vxlan_vni=5001,
        bridge="brvx-5001",
        device="vnet3",
        mac="02:00:00:00:00:01",
        instance_uuid="6f1c6c4e-0000-4000-8000-000000000001",
        domain_name="i-2-10-VM",
        ifindex=42,
        final_at_delete=True,
    )
    old = legacy.IPMeasure.FromString(m.SerializeToString())
    assert old.IsInitialized()
    assert (old.header, old.saddr, old.bytes, old.start, old.end) == (SCHEMA_VERSION, 0, 0, 10, 20)


def test_legacy_message_missing_required_field_is_rejected_by_legacy_parser() -> None:
    # The legacy contract is really proto2-required: a message without `bytes` is incomplete
    # for it, which is why kvmeter always sets the five fields.
    partial = legacy.IPMeasure.FromString(pb.IPMeasure(header=1, saddr=1, start=1, end=2).SerializeToString())
    assert not partial.IsInitialized()
    assert partial.FindInitializationErrors() == ["bytes"]
    with pytest.raises(Exception, match="bytes"):
        partial.SerializeToString()


def test_batch_round_trip_keeps_every_section() -> None:
    batch = pb.MeasureBatch(
        schema=SCHEMA_VERSION,
        host_id="kvm-01",
        boot_id="b0",
        stream_id="s1",
        seq=7,
        poll_time=1234,
        final=True,
    )
    batch.measures.add(header=SCHEMA_VERSION, bytes=9, start=1, end=2, direction=pb.VM_RX)
    dom = batch.inventory.add(uuid="u1", name="r-5-VM", state=pb.RUNNING, kind=pb.VIRTUAL_ROUTER)
    dom.owner["ownerAccountUuid"] = "acct-1"
    dom.nics.add(mac="02:00:00:00:00:05", device="vnet5", bridge="cloud0", traffic_type=pb.CONTROL)
    back = pb.MeasureBatch.FromString(batch.SerializeToString())
    assert back == batch
    assert back.inventory[0].owner["ownerAccountUuid"] == "acct-1"


def test_lifecycle_event_round_trip() -> None:
    ev = pb.LifecycleEvent(
        event_id="e1",
        category=pb.USAGE,
        event_type="VM.START",
        resource_type="VirtualMachine",
        resource_uuid="vm-1",
        account_uuid="acct-1",
        account_is_owner=True,
        time=1_700_000_000_000,
    )
    ev.attributes["zone"] = "z1"
    assert pb.LifecycleEvent.FromString(ev.SerializeToString()) == ev
