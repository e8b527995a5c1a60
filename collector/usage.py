"""Usage values from lifecycle histories and measures, with CloudStack's types and keys.

    time_usage(history: ResourceHistory, now_ms: int, window_ms: int, since_ms: int | None = None)
        -> list[UsageValue]
    covered_range(history, now_ms, window_ms, since_ms=None) -> tuple[int, int] | None
    byte_increments(measure: Measure, account: str, window_ms: int, billable: frozenset[str])
        -> list[ByteIncrement]
    rawusage(usage_type: int, quantity: int) -> str
    byte_usage_type(direction: str) -> int
    byte_resource(measure: Measure) -> str

Keys are deterministic (UsageKey), so a replay or a duplicate lands on the same row:
- time types 1 RUNNING_VM / 2 ALLOCATED_VM / 3 IP_ADDRESS: account = the owner of each moment of
  the segment (its owner at its start, then each owner change while it is open),
  resource = the resource uuid, offering = the segment's offering, detail = the segment's size
  where the VM's own (a custom offering's vCPUs / memory MiB, "2/2048": vm_size.py), else "".
- byte types 4 (VM sent) / 5 (VM received): resource = instance uuid, else domain name, else the
  address (a legacy five-field measure), offering = "", detail = traffic type.
"""

from __future__ import annotations

from collections import defaultdict
from decimal import ROUND_HALF_EVEN, Decimal
from itertools import pairwise

from kvmeter.collector.errors import BAD_DIRECTION, UNKNOWN_USAGE_TYPE, BadInput
from kvmeter.collector.model import (
    ALLOCATED_VM,
    IP_ADDRESS,
    NETWORK_BYTES_RECEIVED,
    NETWORK_BYTES_SENT,
    RUNNING_VM,
    USAGE_TYPE_NAMES,
    ByteIncrement,
    Measure,
    ResourceHistory,
    Segment,
    UsageKey,
    UsageValue,
)
from kvmeter.collector.windows import DAY_MS, check_window, split_bytes, window_start, windows_between

HOUR_MS = 3_600_000
TIME_TYPES = frozenset({RUNNING_VM, ALLOCATED_VM, IP_ADDRESS})
BYTE_TYPES = frozenset({NETWORK_BYTES_SENT, NETWORK_BYTES_RECEIVED})
_SIX_PLACES = Decimal("0.000001")
_BYTE_TYPE_OF = {"sent": NETWORK_BYTES_SENT, "received": NETWORK_BYTES_RECEIVED}


def time_usage(
    history: ResourceHistory, now_ms: int, window_ms: int, since_ms: int | None = None
) -> list[UsageValue]:
    """Time in state per window for RUNNING_VM, ALLOCATED_VM and IP_ADDRESS, sorted by key.

    Covers every window from the one holding the first segment's start (or, with since_ms, the
    one holding since_ms, whichever is later) up to the one holding now_ms: open segments count up
    to now_ms, nothing after now_ms is counted and no later window is emitted. Only positive
    quantities are returned, and the result is the complete set for the resource over that range
    (see covered_range): a stored time record of this resource in the range that is not in the
    result is now zero (a late event removed it). Segments whose owner is unknown (no usage event
    named one, e.g. a system VM seen only through state events) are left out: never guessed.
    since_ms keeps a periodic refresh of a VM running for months cheap: pass the start of the
    oldest window still open.
    """
    check_window(window_ms)
    floor = window_start(since_ms, window_ms) if since_ms is not None else None
    totals: dict[UsageKey, int] = defaultdict(int)
    for usage_type, segments in (
        (RUNNING_VM, history.running),
        (ALLOCATED_VM, history.allocated),
        (IP_ADDRESS, history.ip),
    ):
        for seg in segments:
            if not seg.account:
                continue
            start = seg.start_ms if floor is None else max(seg.start_ms, floor)
            end = now_ms if seg.end_ms is None else min(seg.end_ms, now_ms)
            if end <= start:
                continue
            for part_start, part_end, account in _owned_parts(history, seg, start, end):
                for ws, we in windows_between(part_start, part_end, window_ms):
                    key = UsageKey(account, usage_type, history.resource_uuid, seg.offering, seg.size, ws, we)
                    totals[key] += min(we, part_end) - max(ws, part_start)
    return [UsageValue(key, ms) for key, ms in sorted(totals.items())]


def _owned_parts(history: ResourceHistory, seg: Segment, start: int, end: int) -> list[tuple[int, int, str]]:
    """[start, end) of a segment cut where its resource changed owner: each part billed to the
    owner of its time (a move while the segment stays open: VM.DESTROY / VM.CREATE under
    allocated_until "expunge", or an assignment whose closer the bus lost)."""
    cuts = sorted({o.time_ms for o in history.owners[1:] if start < o.time_ms < end})
    if not cuts:
        return [(start, end, seg.account)]
    bounds = [start, *cuts, end]
    return [
        (a, b, (history.owner_at(a) if a > seg.start_ms else seg.account) or seg.account)
        for a, b in pairwise(bounds)
    ]


def covered_range(
    history: ResourceHistory, now_ms: int, window_ms: int, since_ms: int | None = None
) -> tuple[int, int] | None:
    """[first window start, end of now's window) that time_usage speaks for; None if no segment."""
    starts = [s.start_ms for s in (*history.running, *history.allocated, *history.ip)]
    if not starts:
        return None
    first = window_start(min(starts), window_ms)
    if since_ms is not None:
        first = max(first, window_start(since_ms, window_ms))
    return first, window_start(now_ms, window_ms) + window_ms


def byte_usage_type(direction: str) -> int:
    """4 for bytes the VM sent, 5 for bytes it received."""
    if direction == "sent":
        return NETWORK_BYTES_SENT
    if direction == "received":
        return NETWORK_BYTES_RECEIVED
    raise BadInput(BAD_DIRECTION, f"direction {direction!r} is neither 'sent' nor 'received'")


def byte_resource(measure: Measure) -> str:
    """The usage record's resource for a measure: instance uuid, domain name or address."""
    return measure.instance_uuid or measure.domain_name or measure.address


def byte_increments(
    measure: Measure, account: str, window_ms: int, billable: frozenset[str]
) -> list[ByteIncrement]:
    """The measure's bytes as additions to type 4/5 records, split across windows exactly.

    Empty for quarantined measures (stored separately by the adapter), for traffic types not in
    `billable` and for zero bytes. `account` may be UNATTRIBUTED once the parking horizon passed.
    """
    traffic = measure.traffic_type
    if measure.quarantine_reason or traffic not in billable or not measure.bytes:
        return []
    usage_type = _BYTE_TYPE_OF.get(measure.direction) or byte_usage_type(measure.direction)
    resource = measure.instance_uuid or measure.domain_name or measure.address
    start, end = measure.start_ms, measure.end_ms
    if window_ms > 0 and not DAY_MS % window_ms and start <= end:
        ws = start - start % window_ms
        if end - ws <= window_ms:  # the common case: inside one window (or zero length)
            key = UsageKey(account, usage_type, resource, "", traffic, ws, ws + window_ms)
            return [ByteIncrement(key, measure.bytes)]
    return [
        ByteIncrement(UsageKey(account, usage_type, resource, "", traffic, ws, we), part)
        for ws, we, part in split_bytes(measure.bytes, start, end, window_ms)
    ]


def rawusage(usage_type: int, quantity: int) -> str:
    """CloudStack's rawusage text: hours ('###########.######') for time types, bytes for 4/5.

    quantity is milliseconds for time types and bytes for byte types. Hours are computed exactly
    and rounded half-even to 6 places (DecimalFormat's default mode), with no grouping, exponent
    or trailing zeros. One deliberate difference: values below one hour keep their leading zero
    ("0.5", where Java's '###########.######' prints ".5"); both parse as the same number.
    """
    if usage_type in BYTE_TYPES:
        return str(int(quantity))
    if usage_type not in TIME_TYPES:
        name = USAGE_TYPE_NAMES.get(usage_type, "unknown")
        raise BadInput(UNKNOWN_USAGE_TYPE, f"usage type {usage_type} ({name}) has no rawusage rule")
    hours = (Decimal(quantity) / Decimal(HOUR_MS)).quantize(_SIX_PLACES, rounding=ROUND_HALF_EVEN)
    text = format(hours, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text
