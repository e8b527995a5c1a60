"""Builders for collector test inputs: CloudStack event-bus records and agent measure batches,
as the real producers put them on the wire (bare compact JSON; serialized MeasureBatch); and
one-item forms of the store's batch writes for tests that look at a single row."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from sqlalchemy.engine import Connection

from kvmeter.collector.model import UsageKey
from kvmeter.collector.store import Store
from kvmeter.proto import pb

HOUR = 3_600_000
T0 = int(dt.datetime(2024, 5, 14, 9, 0, tzinfo=dt.UTC).timestamp() * 1000)  # an hour boundary

ACCT_A = "3c5e0000-0000-4000-8000-0000000acct-a"
ACCT_B = "3c5e0000-0000-4000-8000-0000000acct-b"
VM1 = "9b1f0000-0000-4000-8000-000000000vm1"
VM2 = "9b1f0000-0000-4000-8000-000000000vm2"
ROUTER = "9b1f0000-0000-4000-8000-000000router"
IP1 = "41aa0000-0000-4000-8000-0000000000ip1"
ZONE = "8ad00000-0000-4000-8000-00000000zone"

USAGE_RESOURCE = {"VM": "com.cloud.vm.VirtualMachine", "NET": "com.cloud.network.dao.IPAddressVO"}


def cs_time(ms: int, offset_minutes: int = 0) -> str:
    """CloudStack's `yyyy-MM-dd HH:mm:ss Z` in a given offset."""
    tz = dt.timezone(dt.timedelta(minutes=offset_minutes))
    return dt.datetime.fromtimestamp(ms / 1000, tz).strftime("%Y-%m-%d %H:%M:%S %z")


def usage_event(
    event: str, resource: str, account: str, at_ms: int, offset_minutes: int = 0
) -> tuple[bytes, bytes]:
    """(key, value) of a usage event as the Kafka event bus publishes it."""
    doc = {
        "account": account,
        "zone": ZONE,
        "event": event,
        "resource": USAGE_RESOURCE[event.split(".", 1)[0]],
        "id": resource,
        "eventDateTime": cs_time(at_ms, offset_minutes),
    }
    return resource.encode(), json.dumps(doc, separators=(",", ":")).encode()


def routing_key(value: bytes) -> str:
    """The RabbitMQ routing key CloudStack's RabbitMQEventBus gives this event (reference §1.3):
    eventSource.eventCategory.eventType.resourceType.resourceUUID, '.' -> '-' in each part,
    an empty part '*'. The category, type and resource type are the ones the event was built
    with (they are not in the JSON; classified here as parse_event does)."""
    doc = json.loads(value)
    if "old-state" in doc:
        state = doc.get("event", "OperationSucceeded")
        parts = ["ResourceStateEvent", state, doc.get("resource"), doc.get("id")]
    elif "jobId" in doc:
        parts = ["AsyncJobEvent", "complete", doc.get("instanceType"), doc.get("instanceUuid")]
    elif "status" in doc:
        parts = ["ActionEvent", doc.get("event"), doc.get("entity"), doc.get("entityuuid")]
    else:
        parts = ["UsageEvent", doc.get("event"), doc.get("resource"), doc.get("id")]
    return ".".join((str(part).replace(".", "-") if part else "*") for part in ["management-server", *parts])


def ip_number(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


@dataclass
class M:
    """A measure to put in a batch (kvmeter's full IPMeasure)."""

    start: int
    end: int
    nbytes: int
    direction: int = pb.VM_TX
    traffic: int = pb.PUBLIC
    instance: str = VM1
    domain: str = "i-2-10-VM"
    mac: str = "02:00:3a:7b:00:01"
    address: str = "203.0.113.10"
    device: str = "vnet0"
    quarantined: bool = False

    def to_pb(self) -> pb.IPMeasure:
        m = pb.IPMeasure(
            header=2,
            saddr=ip_number(self.address) if self.address else 0,
            bytes=self.nbytes,
            start=self.start,
            end=self.end,
            direction=self.direction,
            packets=max(1, self.nbytes // 1000),
            traffic_type=self.traffic,
            device=self.device,
            mac=self.mac,
            instance_uuid=self.instance,
            domain_name=self.domain,
        )
        if self.address:
            m.address = ipaddress.ip_address(self.address).packed
        if self.quarantined:
            m.quarantined = True
            m.quarantine_reason = "implausible jump"
        return m


@dataclass
class Stream:
    """One agent incarnation: numbers its batches from 1 like the agent does."""

    stream_id: str
    host_id: str = "host-1"
    seq: int = 0
    owners: dict[str, dict[str, str]] = field(default_factory=dict)  # domain name -> <metadata> owner

    def batch(self, measures: list[M], poll_time: int | None = None) -> bytes:
        self.seq += 1
        b = pb.MeasureBatch(
            schema=1,
            host_id=self.host_id,
            boot_id="boot-" + self.host_id,
            stream_id=self.stream_id,
            seq=self.seq,
            poll_time=poll_time if poll_time is not None else max((m.end for m in measures), default=T0),
        )
        b.measures.extend(m.to_pb() for m in measures)
        for name, owner in self.owners.items():
            dom = b.inventory.add(name=name)
            dom.owner.update(owner)
        return b.SerializeToString()


class Clock:
    """An injected clock (ms since the epoch) that tests move by hand."""

    def __init__(self, now: int):
        self.now = now

    def __call__(self) -> int:
        return self.now


def delimited(values: list[bytes]) -> bytes:
    """Length-delimited protobuf (varint length prefix), as Java's writeDelimitedTo writes."""
    out = bytearray()
    for value in values:
        n = len(value)
        while True:
            byte = n & 0x7F
            n >>= 7
            out.append(byte | (0x80 if n else 0))
            if not n:
                break
        out += value
    return bytes(out)


MIN = 60_000
VM3 = "9b1f0000-0000-4000-8000-000000000vm3"  # measured, but its lifecycle arrives late (or never)


@dataclass
class Scenario:
    """A small cloud's hour of events and measures, with the usage they must give (worked out
    by hand below, independently of the collector's code)."""

    events: list[tuple[bytes, bytes]]
    batches: list[bytes]
    parked_bytes: int
    quarantined_bytes: int


def scenario() -> Scenario:
    events = [
        usage_event("VM.CREATE", VM1, ACCT_A, T0 - HOUR),
        usage_event("VM.START", VM1, ACCT_A, T0 + 30 * MIN, offset_minutes=330),  # +0530 on the wire
        usage_event("VM.STOP", VM1, ACCT_A, T0 + 90 * MIN, offset_minutes=-480),
        usage_event("NET.IPASSIGN", IP1, ACCT_A, T0 + 15 * MIN),
        usage_event("VM.CREATE", VM2, ACCT_B, T0),
        usage_event("VM.START", VM2, ACCT_B, T0),
    ]
    s1, s2 = Stream("stream-h1", "h1"), Stream("stream-h2", "h2")
    batches = [
        s1.batch([
            M(T0 + 10 * MIN, T0 + 70 * MIN, 1200),  # spans a boundary: 1000 + 200 by time
            M(T0, T0 + MIN, 500, direction=pb.VM_RX),
            M(T0, T0 + MIN, 999, traffic=pb.GUEST),  # metered, not billable
        ]),
        s1.batch([M(T0 + 2 * MIN, T0 + 3 * MIN, 5000, quarantined=True)]),
        s2.batch([M(T0 + 2 * HOUR, T0 + 2 * HOUR + 30_000, 3000, instance=VM2, domain="i-3-11-VM",
                    mac="02:00:3a:7b:00:22", address="203.0.113.22")]),
        s2.batch([M(T0 + 20 * MIN, T0 + 21 * MIN, 777, instance=VM3, domain="i-4-12-VM",
                    mac="02:00:3a:7b:00:33", address="198.51.100.33")]),
    ]  # fmt: skip
    return Scenario(events, batches, parked_bytes=777, quarantined_bytes=5000)


def expected_usage(now: int) -> dict[tuple[str, int, str, str, int], int]:
    """{(account, type, resource, detail, window start): net quantity} for scenario() at `now`
    (an hour boundary after T0 + 2h): ms for time types, bytes for 4/5."""
    out: dict[tuple[str, int, str, str, int], int] = {}
    hours = range(T0, now, HOUR)
    for ws in range(T0 - HOUR, now, HOUR):
        out[(ACCT_A, 2, VM1, "", ws)] = HOUR  # allocated from T0-1h, never destroyed
    out[(ACCT_A, 1, VM1, "", T0)] = 30 * MIN  # running 10:30-11:30 (local +0530 = 09:30 UTC)
    out[(ACCT_A, 1, VM1, "", T0 + HOUR)] = 30 * MIN
    for ws in hours:
        out[(ACCT_A, 3, IP1, "", ws)] = 45 * MIN if ws == T0 else HOUR
        out[(ACCT_B, 1, VM2, "", ws)] = HOUR
        out[(ACCT_B, 2, VM2, "", ws)] = HOUR
    out[(ACCT_A, 4, VM1, "public", T0)] = 1000
    out[(ACCT_A, 4, VM1, "public", T0 + HOUR)] = 200
    out[(ACCT_A, 5, VM1, "public", T0)] = 500
    out[(ACCT_B, 4, VM2, "public", T0 + 2 * HOUR)] = 3000
    return out


def net_by_short_key(net: dict) -> dict[tuple[str, int, str, str, int], int]:  # type: ignore[type-arg]
    """Store.net_usage() keyed like expected_usage() (offering is not part of the scenario)."""
    return {(k.account, k.usage_type, k.resource, k.detail, k.window_start_ms): v for k, v in net.items()}


def insert_event(
    store: Store,
    conn: Connection,
    event_id: str,
    resource: str,
    time_ms: int,
    raw: bytes,
    normalized: bytes,
    now_ms: int,
    record_key: bytes | None = None,
) -> bool:
    """Store one event unless known; True when it is new."""
    return bool(
        store.insert_events(conn, [(event_id, resource, time_ms, raw, normalized, record_key)], now_ms)
    )


def events_of(store: Store, conn: Connection, resource: str) -> list[bytes]:
    """One resource's normalized events in (time, event id) order."""
    return store.events_of_many(conn, [resource]).get(resource, [])


def set_time_values(
    store: Store,
    conn: Connection,
    resource: str,
    values: Mapping[UsageKey, int],
    final_through: int,
    now_ms: int,
    *,
    open_only: bool = False,
) -> tuple[int, int]:
    """Store.set_time_values_many for one resource."""
    return store.set_time_values_many(conn, {resource: values}, final_through, now_ms, open_only=open_only)


def wait_for(condition: Callable[[], bool], timeout: float, what: str, logs: Callable[[], str] = str) -> None:
    """Poll `condition` until it holds; fail saying what was awaited (and `logs()`) after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{logs()}")
