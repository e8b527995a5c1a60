"""Plain data passed between the collector's pure core and its adapters. No I/O here.

The core (cloudstack, lifecycle, attribution, windows, usage) turns inputs into these
values; the store persists them; the API and CLI read them back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass(frozen=True, order=True)
class UsageKey:
    """Identity of one usage record: deterministic, so replays and duplicates land on the same row.

    `detail` separates records that share a resource, e.g. the traffic type of byte usage
    ("public", "guest") ; `offering` is the service offering for VM time usage.
    """

    account: str
    usage_type: int
    resource: str
    offering: str
    detail: str
    window_start_ms: int
    window_end_ms: int


@dataclass(frozen=True)
class ByteIncrement:
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


@dataclass(frozen=True)
class Measure:
    """One decoded IPMeasure with its batch context, as the collector's core sees it."""

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
