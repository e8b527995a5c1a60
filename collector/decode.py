"""Decode one measures-topic record (a protobuf MeasureBatch) into the core's Measure values.

    decode_batch(value: bytes) -> DecodedBatch

Decisions:
- Only batches are accepted; a batch's measures may be kvmeter's full IPMeasure or the original
  five-field message (header, saddr, bytes, start, end). Such a legacy measure has no direction
  and no traffic type: it decodes as direction "sent" (the bytes that left `saddr`, i.e. sent by
  the address's holder) and traffic type LEGACY_TRAFFIC_TYPE ("public": the original producers
  metered public addresses), and is attributed by its address (IP attribution).
- The address is `address` (4 or 16 bytes) when present, else `saddr` when non-zero, else "".
- Measure.owner_hint is the owner map of the batch's inventory entry for the measure's domain
  (matched by instance uuid, else by domain name); {} when there is none. Measures of one domain
  share one dict: read it, never mutate it.
- Rejections (BadInput): malformed_protobuf, missing_stream, missing_seq, missing_interval
  (start or end absent), inverted_interval (end < start), implausible_interval (outside years
  2000-2200 or longer than MAX_MEASURE_SPAN_MS), bad_address (address not 4 or 16 bytes).
  One bad measure rejects its whole batch: the batch is the unit of the stream's sequence.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from kvmeter.collector.errors import (
    BAD_ADDRESS,
    IMPLAUSIBLE_INTERVAL,
    INVERTED_INTERVAL,
    MALFORMED_PROTOBUF,
    MISSING_INTERVAL,
    MISSING_SEQ,
    MISSING_STREAM,
    BadInput,
)
from kvmeter.collector.model import Measure
from kvmeter.proto import pb

LEGACY_TRAFFIC_TYPE = "public"
MIN_TIME_MS = 946_684_800_000  # 2000-01-01T00:00:00Z
MAX_TIME_MS = 7_258_118_400_000  # 2200-01-01T00:00:00Z
MAX_MEASURE_SPAN_MS = 31 * 86_400_000
TRAFFIC_TYPES = {
    pb.TRAFFIC_UNKNOWN: "",
    pb.PUBLIC: "public",
    pb.GUEST: "guest",
    pb.MANAGEMENT: "management",
    pb.STORAGE: "storage",
    pb.CONTROL: "control",
    pb.PRIVATE_GATEWAY: "private_gateway",
}
_TRAFFIC: dict[int, str] = {int(k): v for k, v in TRAFFIC_TYPES.items()}
VM_RX = int(pb.VM_RX)
_NO_HINT: dict[str, str] = {}  # shared, never mutated: measures only read their hint
_ADDRESSES: dict[bytes, str] = {}  # packed address -> text; pure memo, bounded
_ADDRESS_CACHE_SIZE = 100_000
SENT = "sent"  # VM tx
RECEIVED = "received"  # VM rx


@dataclass
class DecodedBatch:
    """One MeasureBatch, validated; (stream_id, seq) is what the store's high-water mark guards."""

    stream_id: str
    seq: int
    host_id: str
    boot_id: str
    poll_time_ms: int
    final: bool
    measures: list[Measure] = field(default_factory=list)
    inventory: list[pb.DomainInventory] = field(default_factory=list)


def decode_batch(value: bytes) -> DecodedBatch:
    """Parse and validate one MeasureBatch (see module doc for decisions and reasons)."""
    try:
        batch = pb.MeasureBatch.FromString(value)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise BadInput(MALFORMED_PROTOBUF, f"not a MeasureBatch: {exc}") from None
    if not batch.stream_id:
        raise BadInput(MISSING_STREAM, "batch has no stream_id")
    if batch.seq < 1:
        raise BadInput(MISSING_SEQ, f"batch of stream {batch.stream_id} has no sequence number")
    hints_by_uuid: dict[str, dict[str, str]] = {}
    hints_by_name: dict[str, dict[str, str]] = {}
    for dom in batch.inventory:
        owner = dict(dom.owner)
        if dom.uuid:
            hints_by_uuid[dom.uuid] = owner
        if dom.name:
            hints_by_name[dom.name] = owner
    out = DecodedBatch(
        stream_id=batch.stream_id,
        seq=batch.seq,
        host_id=batch.host_id,
        boot_id=batch.boot_id,
        poll_time_ms=batch.poll_time,
        final=batch.final,
        inventory=list(batch.inventory),
    )
    stream_id, seq, host_id = batch.stream_id, batch.seq, batch.host_id
    append = out.measures.append
    # The hot loop of the collector: plain locals, one cached text per distinct address.
    for index, m in enumerate(batch.measures):
        start, end = m.start, m.end
        if end < start or start < MIN_TIME_MS or end > MAX_TIME_MS or end - start > MAX_MEASURE_SPAN_MS:
            _reject_interval(m, f"measure {index} of {stream_id}/{seq}")
        direction_set = m.HasField("direction")
        if not direction_set and not m.HasField("traffic_type"):  # the original five fields
            direction, traffic = SENT, LEGACY_TRAFFIC_TYPE
        else:
            direction = RECEIVED if m.direction == VM_RX else SENT
            traffic = _TRAFFIC.get(m.traffic_type, "")
        uuid, name = m.instance_uuid, m.domain_name
        hint = hints_by_uuid.get(uuid) if uuid else None
        if hint is None:
            hint = hints_by_name.get(name, _NO_HINT) if name else _NO_HINT
        raw = m.address
        address = _ADDRESSES.get(raw) if raw else None
        if address is None:
            address = _address(m, f"measure {index} of {stream_id}/{seq}")
        append(
            Measure(
                stream_id, seq, index, host_id, start, end, direction, m.bytes, m.packets, traffic, uuid,
                m.mac.lower(), address, name, m.device, m.final_at_delete,
                (m.quarantine_reason or "quarantined") if m.quarantined else "",
                hint,
            )
        )  # fmt: skip
    return out


def _reject_interval(m: pb.IPMeasure, where: str) -> None:
    if not (m.HasField("start") and m.HasField("end")):
        raise BadInput(MISSING_INTERVAL, f"{where} has no start or end")
    if m.end < m.start:
        raise BadInput(INVERTED_INTERVAL, f"{where} ends ({m.end}) before it starts ({m.start})")
    raise BadInput(IMPLAUSIBLE_INTERVAL, f"{where} has an implausible interval [{m.start}, {m.end})")


def _address(m: pb.IPMeasure, where: str) -> str:
    raw = m.address
    if raw:
        if len(raw) not in (4, 16):
            raise BadInput(BAD_ADDRESS, f"{where} has a {len(raw)}-byte address")
        addr = ipaddress.ip_address(raw)
        text = "" if addr.is_unspecified else str(addr)  # all zeros: the agent did not know it
        if len(_ADDRESSES) >= _ADDRESS_CACHE_SIZE:
            _ADDRESSES.clear()
        _ADDRESSES[raw] = text
        return text
    if m.saddr:
        return str(ipaddress.IPv4Address(m.saddr))
    return ""
