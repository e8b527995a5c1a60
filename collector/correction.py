"""A correction: one lifecycle event the reconciler adds (collector/reconcile.py), with its source
and reason, as CloudStack's event bus would carry it, so it is stored and applied like any other.

    Correction(...).event_value() -> bytes   # canonical JSON: the same correction, the same id
    Correction(...).event_id -> str
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass

from kvmeter.collector.cloudstack import event_id

SOURCE = "cloudstack-api"
POST_TRANSITION = "postStateTransitionEvent"


@dataclass(frozen=True)
class Correction:
    resource_uuid: str
    resource_type: str  # VirtualMachine | IpAddress | DomainRouter
    event_type: str
    time_ms: int
    account: str
    reason: str
    offering: str = ""
    address: str = ""
    zone: str = ""
    details: tuple[tuple[str, str], ...] = ()
    source: str = SOURCE
    states: tuple[str, str] | None = None  # (old, new): a resource-state event, not a usage event

    def event_value(self) -> bytes:
        """The correction as a bus usage event, or a resource-state event when `states` is set
        (canonical JSON: the same correction, the same bytes, the same event id)."""
        if self.states:
            state = {"resource": self.resource_type, "id": self.resource_uuid, "status": POST_TRANSITION}
            state.update({"old-state": self.states[0], "new-state": self.states[1]})
            state.update({"eventDateTime": _format_time(self.time_ms), "source": self.source})
            state["reason"] = self.reason
            return json.dumps(state, sort_keys=True, separators=(",", ":")).encode()
        doc: dict[str, str] = {
            "event": self.event_type,
            "resource": self.resource_type,
            "id": self.resource_uuid,
            "eventDateTime": _format_time(self.time_ms),
            "source": self.source,
            "reason": self.reason,
        }
        for key, value in (("account", self.account), ("zone", self.zone)):
            if value:
                doc[key] = value
        if self.offering:
            doc["offeringid"] = self.offering
        if self.address:
            doc["ipaddress"] = self.address
        doc.update(self.details)
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @property
    def event_id(self) -> str:
        return event_id(self.event_value())


def _format_time(ms: int) -> str:
    when = dt.datetime.fromtimestamp(ms // 1000, dt.UTC)
    return f"{when:%Y-%m-%d %H:%M:%S}.{ms % 1000:03d} +0000"
