"""Decode one measures-topic record (a protobuf MeasureBatch) into columns of the core's measures.

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
- A batch keeps its measures in columns (DecodedBatch), each measure's billing fields in a Target
  shared by all measures with the same ones; DecodedBatch.measure(i) builds the Measure value.
- Rejections (BadInput): malformed_protobuf, missing_stream, missing_seq, missing_interval
  (start or end absent), inverted_interval (end < start), implausible_interval (outside years
  2000-2200 or longer than MAX_MEASURE_SPAN_MS), bad_address (address not 4 or 16 bytes),
  bad_seq (seq past int64), implausible_bytes (bytes past int64), bad_direction (a kvmeter
  measure whose direction is neither VM_RX nor VM_TX: never guessed as sent), bad_text (a string
  field of the batch, its inventory, or a measure's instance_uuid, domain_name or
  quarantine_reason that is not UTF-8: protobuf's upb runtime hands such a proto2 field back as
  bytes; a measure's mac and device are shown with such bytes escaped instead, see _escaped).
  One bad measure rejects its whole batch: the batch is the unit of the stream's sequence.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from kvmeter.collector.errors import (
    BAD_ADDRESS,
    BAD_DIRECTION,
    BAD_SEQ,
    BAD_TEXT,
    IMPLAUSIBLE_BYTES,
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
INT64_MAX = 2**63 - 1  # the store's integers (SQLite INTEGER, PostgreSQL bigint)
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
VM_TX = int(pb.VM_TX)
_NO_HINT: dict[str, str] = {}  # shared, never mutated: measures only read their hint
# (direction, traffic type, uuid, name, packed address, saddr) -> Target; a pure memo, bounded
_TARGETS: dict[tuple[int, int, str, str, bytes, int], Target] = {}
_TARGET_CACHE_SIZE = 200_000
_LEGACY = -1  # direction code of a measure with only the original five fields
SENT = "sent"  # VM tx
RECEIVED = "received"  # VM rx


@dataclass(eq=False, slots=True)
class Target:
    """Where a measure's bytes go, as billing and attribution see it: the part of a measure that
    is the same on every poll of one counter direction. decode_batch shares one Target among
    all measures with equal fields (identity hash: a cheap per-chunk dict key). Read-only."""

    direction: str
    traffic_type: str
    instance_uuid: str
    domain_name: str
    address: str


@dataclass
class DecodedBatch:
    """One MeasureBatch, validated; (stream_id, seq) is what the store's high-water mark guards.

    Measures are kept in columns, measure i being (targets[i], starts[i], ends[i], amounts[i]),
    plus quarantined {i: reason}: no Python object per measure, so a chunk of a million measures
    costs no garbage-collector passes. The fields no usage key needs (mac, device, packets,
    final_at_delete) are read from the parsed message only by measure(i), for the measures that
    are parked or quarantined.
    """

    stream_id: str
    seq: int
    host_id: str
    boot_id: str
    poll_time_ms: int
    final: bool
    inventory: list[pb.DomainInventory] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    amounts: list[int] = field(default_factory=list)
    quarantined: dict[int, str] = field(default_factory=dict)
    interval: tuple[int, int] | None = None  # (start, end) when every measure has it: one poll
    message: pb.MeasureBatch | None = None
    hints_by_uuid: dict[str, dict[str, str]] = field(default_factory=dict)
    hints_by_name: dict[str, dict[str, str]] = field(default_factory=dict)

    def owner_hint(self, target: Target) -> dict[str, str]:
        """The owner fields of the target's domain in this batch's inventory ({} when none)."""
        hint = self.hints_by_uuid.get(target.instance_uuid) if target.instance_uuid else None
        if hint is None:
            hint = self.hints_by_name.get(target.domain_name, _NO_HINT) if target.domain_name else _NO_HINT
        return hint

    def measure(self, i: int) -> Measure:
        """Measure i as a Measure value (for parking, quarantine and the generic path)."""
        t = self.targets[i]
        m = self.message.measures[i] if self.message is not None else pb.IPMeasure()
        return Measure(
            self.stream_id, self.seq, i, self.host_id, self.starts[i], self.ends[i], t.direction,
            self.amounts[i], m.packets, t.traffic_type, t.instance_uuid, _escaped(m.mac).lower(),
            t.address, t.domain_name, _escaped(m.device), m.final_at_delete, self.quarantined.get(i, ""),
            self.owner_hint(t),
        )  # fmt: skip

    @property
    def measures(self) -> list[Measure]:
        return [self.measure(i) for i in range(len(self.targets))]


def decode_batch(value: bytes) -> DecodedBatch:
    """Parse and validate one MeasureBatch (see module doc for decisions and reasons)."""
    try:
        batch = pb.MeasureBatch.FromString(value)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise BadInput(MALFORMED_PROTOBUF, f"not a MeasureBatch: {exc}") from None
    if not batch.stream_id:
        raise BadInput(MISSING_STREAM, "batch has no stream_id")
    for name in ("stream_id", "host_id", "boot_id"):
        _text(getattr(batch, name), f"batch field {name}")
    if batch.seq < 1:
        raise BadInput(MISSING_SEQ, f"batch of stream {batch.stream_id} has no sequence number")
    if batch.seq > INT64_MAX:
        raise BadInput(BAD_SEQ, f"batch of stream {batch.stream_id} has sequence number {batch.seq}")
    for dom in batch.inventory:
        _inventory_text(dom, f"inventory of {batch.stream_id}/{batch.seq}")
    out = DecodedBatch(
        stream_id=batch.stream_id,
        seq=batch.seq,
        host_id=batch.host_id,
        boot_id=batch.boot_id,
        poll_time_ms=batch.poll_time,
        final=batch.final,
        inventory=list(batch.inventory),
        message=batch,
    )
    for dom in batch.inventory:
        owner = dict(dom.owner)
        if dom.uuid:
            out.hints_by_uuid[dom.uuid] = owner
        if dom.name:
            out.hints_by_name[dom.name] = owner
    stream_id, seq = batch.stream_id, batch.seq
    targets, starts, ends, amounts = out.targets, out.starts, out.ends, out.amounts
    add_target, add_start, add_end, add_amount = targets.append, starts.append, ends.append, amounts.append
    known = _TARGETS
    # The hot loop of the collector: plain locals, only the fields a usage key needs, one shared
    # Target per distinct value.
    for index, m in enumerate(batch.measures):
        start, end = m.start, m.end
        if end < start or start < MIN_TIME_MS or end > MAX_TIME_MS or end - start > MAX_MEASURE_SPAN_MS:
            _reject_interval(m, f"measure {index} of {stream_id}/{seq}")
        direction, traffic, raw = m.direction, m.traffic_type, m.address
        if not direction and not traffic and not m.HasField("direction") and not m.HasField("traffic_type"):
            direction = _LEGACY  # the original five fields
        key = (direction, traffic, m.instance_uuid, m.domain_name, raw, 0 if raw else m.saddr)
        target = known.get(key)
        if target is None:
            target = _target(m, key, f"measure {index} of {stream_id}/{seq}")
        add_target(target)
        add_start(start)
        add_end(end)
        add_amount(m.bytes)
        if m.quarantined:
            reason = m.quarantine_reason
            _text(reason, f"measure {index} of {stream_id}/{seq}: quarantine_reason")
            out.quarantined[index] = reason or "quarantined"
    if amounts and max(amounts) > INT64_MAX:  # one C-level pass, not a test per measure
        index = next(i for i, n in enumerate(amounts) if n > INT64_MAX)
        raise BadInput(IMPLAUSIBLE_BYTES, f"measure {index} of {stream_id}/{seq} has {amounts[index]} bytes")
    if starts and starts.count(starts[0]) == len(starts) and ends.count(ends[0]) == len(ends):
        out.interval = (starts[0], ends[0])
    return out


def _target(m: pb.IPMeasure, key: tuple[int, int, str, str, bytes, int], where: str) -> Target:
    direction, traffic, uuid, name = key[:4]
    _text(uuid, f"{where}: instance_uuid")
    _text(name, f"{where}: domain_name")
    address = _address(m, where)
    if direction == _LEGACY:
        target = Target(SENT, LEGACY_TRAFFIC_TYPE, uuid, name, address)
    elif direction != VM_RX and direction != VM_TX:  # never guessed: only a legacy measure is sent
        raise BadInput(BAD_DIRECTION, f"{where} has direction {direction}, neither VM_RX nor VM_TX")
    else:
        target = Target(
            RECEIVED if direction == VM_RX else SENT, _TRAFFIC.get(traffic, ""), uuid, name, address
        )
    if len(_TARGETS) >= _TARGET_CACHE_SIZE:
        _TARGETS.clear()
    _TARGETS[key] = target
    return target


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
        return "" if addr.is_unspecified else str(addr)  # all zeros: the agent did not know it
    if m.saddr:
        return str(ipaddress.IPv4Address(m.saddr))
    return ""


def _escaped(value: str | bytes) -> str:
    """mac and device, informational, are read only here (checked in decode_batch's loop they
    would cost the collector a fifth more decoding): not UTF-8, they are kept, their bytes that
    are not UTF-8 escaped (\\xNN), rather than refused."""
    return value if isinstance(value, str) else value.decode("utf-8", "backslashreplace")


def _text(value: object, where: str) -> None:
    """A proto2 string field that is not UTF-8 comes back from upb as bytes: refuse it."""
    if type(value) is not str:
        raise BadInput(BAD_TEXT, f"{where} is not UTF-8 text: {value!r:.80}")


_DOMAIN_TEXT = ("uuid", "name", "account_id", "vm_id")
_NIC_TEXT = ("mac", "device", "bridge", "network", "model", "nic_type")


def _inventory_text(dom: pb.DomainInventory, where: str) -> None:
    """Every string of a domain's inventory record (read directly: a generic walk of the fields
    took six times the whole decoding of an inventory)."""
    for name in _DOMAIN_TEXT:
        _text(getattr(dom, name), f"{where}: {name}")
    for key, value in dom.owner.items():
        _text(key, f"{where}: owner key")
        _text(value, f"{where}: owner[{key}]")
    for nic in dom.nics:
        for name in _NIC_TEXT:
            _text(getattr(nic, name), f"{where}: nics.{name}")
