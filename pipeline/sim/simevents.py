"""CloudStack event-bus messages as a management server publishes them (reference §1.5, §1.7).

Kafka record: key = resource UUID, value = the bare JSON description. Usage events carry the
owner account. The bus form has no offering; CloudStack keeps it in `cloud.usage_event`, so a
simulated feed adds it as `offeringid` on VM events (the collector reads it when present).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass

VM_RESOURCE = "com.cloud.vm.VirtualMachine"  # the <=4.17-and-still-today usage form
IP_RESOURCE = "com.cloud.network.dao.IPAddressVO"


def cloudstack_time(ms: int, offset_minutes: int = 0) -> str:
    """`yyyy-MM-dd HH:mm:ss Z` in a management server's local zone (second resolution)."""
    tz = dt.timezone(dt.timedelta(minutes=offset_minutes))
    return dt.datetime.fromtimestamp(ms / 1000, tz).strftime("%Y-%m-%d %H:%M:%S %z")


@dataclass(frozen=True)
class EventBus:
    """Builds records for one zone; `offset_minutes` is the management server JVM's zone."""

    zone: str = "8ad0c6a2-0000-4000-8000-000000000001"
    offset_minutes: int = 0

    def usage(
        self, event: str, resource: str, uuid: str, account: str, ms: int, **extra: str
    ) -> tuple[bytes, bytes]:
        body = {
            "account": account,
            "zone": self.zone,
            "event": event,
            "resource": resource,
            "id": uuid,
            "eventDateTime": cloudstack_time(ms, self.offset_minutes),
            **extra,
        }
        return uuid.encode(), json.dumps(body).encode()

    def action(
        self, event: str, entity: str, uuid: str, caller: str, ms: int, status: str = "Completed"
    ) -> tuple[bytes, bytes]:
        body = {
            "eventDateTime": cloudstack_time(ms, self.offset_minutes),
            "status": status,
            "event": event,
            "entity": entity,
            "entityuuid": uuid,
            "account": caller,
            "user": "7d2a0000-0000-4000-8000-000000000002",
            entity: uuid,
            "description": f"Successfully completed {event}",
        }
        return uuid.encode(), json.dumps(body).encode()

    def vm(self, event: str, vm_uuid: str, account: str, ms: int, offering: str = "") -> tuple[bytes, bytes]:
        extra = {"offeringid": offering} if offering else {}
        return self.usage(event, VM_RESOURCE, vm_uuid, account, ms, **extra)

    def ip(self, event: str, ip_uuid: str, account: str, ms: int, address: str) -> tuple[bytes, bytes]:
        return self.usage(event, IP_RESOURCE, ip_uuid, account, ms, ipaddress=address)
