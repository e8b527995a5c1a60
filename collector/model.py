"""Plain data passed between the collector's pure core and its adapters. No I/O here.

The core (cloudstack, lifecycle, attribution, windows, usage) turns inputs into these
values; the store persists them; the API and CLI read them back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from kvmeter.collector.event_shapes import DEFAULT_MAX_EVENT_BYTES
from kvmeter.collector.policy import DEFAULT_POLICY, BillingPolicy

# CloudStack usage type ids (api/.../usage/UsageTypes.java).
RUNNING_VM = 1
ALLOCATED_VM = 2
IP_ADDRESS = 3
NETWORK_BYTES_SENT = 4
NETWORK_BYTES_RECEIVED = 5
USAGE_TYPE_NAMES = {
    RUNNING_VM: "RUNNING_VM",
    ALLOCATED_VM: "ALLOCATED_VM",
    IP_ADDRESS: "IP_ADDRESS",
    NETWORK_BYTES_SENT: "NETWORK_BYTES_SENT",
    NETWORK_BYTES_RECEIVED: "NETWORK_BYTES_RECEIVED",
}

UNATTRIBUTED = ""  # account of bytes whose owner stayed unknown past the parking horizon
# An adjustment's reason: what changed a final window. Free text in the store (an old row keeps
# the reason it was made with); these are the ones kvmeter writes.
LATE_LIFECYCLE = "late lifecycle"  # events of the resource came after its window was final
POLICY_CHANGE = "policy change"  # a changed [policy] put in force over the store (policy_change.py)


class UsageKey(NamedTuple):
    """Identity of one usage record: deterministic, so replays and duplicates land on the same row.

    `detail` separates records that share a resource, e.g. the traffic type of byte usage
    ("public", "guest") ; `offering` is the service offering for VM time usage.
    A NamedTuple, not a dataclass: millions are built and hashed per second on the hot path.
    """

    account: str
    usage_type: int
    resource: str
    offering: str
    detail: str
    window_start_ms: int
    window_end_ms: int


class ByteIncrement(NamedTuple):
    """Bytes to add to one record (types 4/5): additive, so order never matters."""

    key: UsageKey
    bytes: int


@dataclass(frozen=True)
class UsageValue:
    """The whole current value of one time-based record (types 1-3), recomputed from lifecycle.

    quantity_ms is the time the resource was in the state within the window.
    """

    key: UsageKey
    quantity_ms: int


@dataclass(slots=True)
class Measure:
    """One decoded IPMeasure with its batch context, as the collector's core sees it.

    Treat as read-only. Not frozen only because a frozen dataclass is four times slower to
    build, and decoding builds one per measure.
    """

    stream_id: str
    seq: int
    index: int  # position in its batch: (stream_id, seq, index) identifies a measure
    host_id: str
    start_ms: int
    end_ms: int
    direction: str  # "sent" (VM tx) or "received" (VM rx)
    bytes: int
    packets: int
    traffic_type: str
    instance_uuid: str
    mac: str
    address: str  # textual IP, "" when unknown
    domain_name: str
    device: str
    final_at_delete: bool = False
    quarantine_reason: str = ""
    owner_hint: dict[str, str] = field(default_factory=dict)  # agent-supplied <metadata> of the domain


# Lifecycle segment kinds, one list each in ResourceHistory.
RUNNING = "running"
ALLOCATED = "allocated"
IP_ASSIGNED = "ip"


@dataclass(frozen=True)
class Segment:
    """A span of one state of one resource: [start_ms, end_ms), end_ms None while still open.

    `account` is the owner at start_ms ("" when no usage event has told the owner yet);
    `offering` the service offering when an event carried one, else "";
    `address` the textual IP of an IP-address resource when known, else "";
    `size` a VM's own vCPUs / memory when an event named them (vm_size.py), else "".
    """

    start_ms: int
    end_ms: int | None
    offering: str = ""
    account: str = ""
    address: str = ""
    size: str = ""


@dataclass(frozen=True)
class OwnerChange:
    """From `time_ms` on, `account` owns the resource (only usage events set this)."""

    time_ms: int
    account: str


@dataclass
class ResourceHistory:
    """What the lifecycle state machine derived for one resource (a VM or an IP address).

    owners: the owner timeline in event order; running / allocated / ip: segments in time order;
    macs / addresses: NIC MACs and IPs seen in events about the resource (for an IP-address
    resource, its own address), i.e. what a parked measure of this resource may carry;
    applied / ignored: event ids that changed state / did not (duplicates, audit-only events).
    """

    resource_uuid: str
    resource_type: str = ""
    owners: list[OwnerChange] = field(default_factory=list)
    running: list[Segment] = field(default_factory=list)
    allocated: list[Segment] = field(default_factory=list)
    ip: list[Segment] = field(default_factory=list)
    macs: list[str] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    # Created but not yet billed as allocated (policy allocated_from = "first_start", never started).
    allocation_pending: bool = False

    def owner_at(self, time_ms: int) -> str | None:
        """The owner at time_ms: the last change at or before it; before the first change the
        first known owner (CloudStack changes a VM's owner only through usage events that we
        see as changes); None when no usage event named an owner."""
        if not self.owners:
            return None
        lo, hi = 0, len(self.owners)
        while lo < hi:  # bisect_right on time: at equal times the later change wins
            mid = (lo + hi) // 2
            if self.owners[mid].time_ms <= time_ms:
                lo = mid + 1
            else:
                hi = mid
        return self.owners[max(lo - 1, 0)].account


# -- the collector's settings, its input records and what it did with them -----------------
@dataclass(frozen=True)
class Settings:
    """How the collector windows, finalizes, parks and bills (the config's [usage], routers and
    [policy])."""

    window_ms: int = 3_600_000
    grace_ms: int = 2 * 3_600_000
    park_horizon_ms: int = 24 * 3_600_000
    billable: frozenset[str] = frozenset({"public"})
    routers: Mapping[str, str] = field(default_factory=dict)  # router domain name / uuid -> account
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES  # a bigger lifecycle event is dead-lettered
    policy: BillingPolicy = DEFAULT_POLICY  # which events open and close what is billed ([policy])
    # A resource whose lifecycle closed longer ago than this (and than grace_ms) leaves memory
    # and is reloaded from the store when touched again (residency.py); None keeps every one.
    evict_after_ms: int | None = 24 * 3_600_000


@dataclass(frozen=True)
class Record:
    """One input record and where it came from (topic/partition@offset, file:line)."""

    value: bytes
    key: bytes | None = None
    origin: str = ""
    # (source, sequence): its place in the source's own stored order (topic/partition and
    # offset, file and line); None where the source keeps none. Lifecycle: see lifecycle.py.
    order: tuple[str, int] | None = None


@dataclass(frozen=True)
class DeadLetter:
    """Input that could not be used, kept with its bytes and the reason."""

    source: str  # "measures" | "lifecycle"
    origin: str  # where it came from: topic/partition@offset or file:line
    raw: bytes
    reason: str
    message: str
    key: bytes | None = None  # the record's key (a lifecycle event may name its resource only there)


@dataclass
class Outcome:
    """What one call did; adapters turn it into metrics and logs."""

    batches: int = 0
    duplicates: int = 0
    measures: int = 0
    billed_bytes: int = 0
    parked: int = 0
    unparked: int = 0
    unattributed: int = 0  # parked measures newly reported as unattributed
    quarantined: int = 0
    events: int = 0
    known_events: int = 0
    records: int = 0
    adjustments: int = 0
    finalized: int = 0
    pruned_bytes: int = 0  # bytes of measures dead-lettered as of a pruned resource's past
    dead_letters: list[DeadLetter] = field(default_factory=list)

    def add(self, other: Outcome) -> None:
        for name in self.__dataclass_fields__:
            if name == "dead_letters":
                self.dead_letters.extend(other.dead_letters)
            else:
                setattr(self, name, getattr(self, name) + getattr(other, name))
