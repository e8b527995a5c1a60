"""What one reconciliation pass read from CloudStack's API, as plain values (no I/O here).

    parse_snapshot(raw: Mapping[str, list], taken_ms: int) -> Snapshot   # SnapshotError on garbage
    snapshot_to_json(snapshot) -> str / snapshot_from_json(text) -> Snapshot  # kept for the next pass
    LISTS: the API commands a pass reads, with the key of their items in the response

The field names are those of CloudStack's response classes (UserVmResponse,
DomainRouterResponse, IPAddressResponse, NetworkResponse, AccountResponse, DomainResponse,
ServiceOfferingResponse, VlanIpRangeResponse). Owners are given by account *name* and domain id;
accounts map them to the account uuids the event bus uses (Snapshot.account_uuid).

Anything that is not a list of objects, or an item without its id, is garbage: the whole
snapshot is refused, so a half-understood answer never turns into corrections.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from kvmeter.collector.cloudstack import parse_time
from kvmeter.collector.errors import BadInput

# command -> the key of its items in `list<command>response` (CloudStack's response names)
LISTS: dict[str, str] = {
    "listVirtualMachines": "virtualmachine",
    "listRouters": "router",
    "listPublicIpAddresses": "publicipaddress",
    "listNetworks": "network",
    "listAccounts": "account",
    "listDomains": "domain",
    "listServiceOfferings": "serviceoffering",
    "listVlanIpRanges": "vlaniprange",  # root admin only (ListVlanIpRangesCmd)
}


class SnapshotError(ValueError):
    """CloudStack answered something this pass cannot trust."""


class ApiUnavailable(RuntimeError):
    """CloudStack's API did not answer, or answered something a pass cannot use."""


@dataclass(frozen=True)
class Vm:
    uuid: str
    name: str
    state: str
    account: str  # account name
    domain_id: str
    project_id: str
    offering: str
    cpu: int | None
    memory: int | None
    created_ms: int | None
    zone: str = ""
    custom: bool = False  # its size is its own (a custom offering's cpuNumber / memory details)
    template: str = ""  # templateid (shown in listUsageRecords)
    cpu_speed: int | None = None  # cpuspeed, MHz (shown in listUsageRecords)
    display: bool = True  # displayvm: a hidden VM (false) has no VM time in CloudStack's usage


@dataclass(frozen=True)
class Router:
    uuid: str
    name: str
    state: str
    network_id: str
    vpc_id: str
    created_ms: int | None


@dataclass(frozen=True)
class PublicIp:
    uuid: str
    address: str
    state: str
    account: str
    domain_id: str
    project_id: str
    allocated_ms: int | None
    zone: str = ""


@dataclass(frozen=True)
class Network:
    uuid: str
    name: str
    account: str
    domain_id: str
    project_id: str
    vpc_id: str


@dataclass(frozen=True)
class Account:
    uuid: str
    name: str
    domain_id: str


@dataclass(frozen=True)
class Domain:
    uuid: str
    name: str
    path: str


@dataclass(frozen=True)
class Offering:
    uuid: str
    name: str
    cpu: int | None
    memory: int | None
    customized: bool = False  # iscustomized: each VM chooses its CPU / memory
    cpu_speed: int | None = None  # cpuspeed, MHz (shown in listUsageRecords)


@dataclass(frozen=True)
class VlanRange:
    uuid: str
    vlan: str  # Vlan.getVlanTag: "vlan://100", "100" or "untagged"
    public: bool  # forvirtualnetwork: a public range (VlanType.VirtualNetwork), not a shared network's
    zone: str = ""


@dataclass(frozen=True)
class Snapshot:
    taken_ms: int
    vms: dict[str, Vm] = field(default_factory=dict)
    routers: dict[str, Router] = field(default_factory=dict)
    ips: dict[str, PublicIp] = field(default_factory=dict)
    networks: dict[str, Network] = field(default_factory=dict)
    accounts: dict[str, Account] = field(default_factory=dict)
    domains: dict[str, Domain] = field(default_factory=dict)
    offerings: dict[str, Offering] = field(default_factory=dict)
    vlans: dict[str, VlanRange] = field(default_factory=dict)

    def account_uuid(self, name: str, domain_id: str, project_id: str = "") -> str | None:
        """The uuid of the account `name` in `domain_id`; None when unknown or ambiguous, and
        for project-owned resources (their owner is the project's account, not listed here)."""
        if project_id or not name or not domain_id:
            return None
        found = {a.uuid for a in self.accounts.values() if a.name == name and a.domain_id == domain_id}
        return found.pop() if len(found) == 1 else None


def parse_snapshot(raw: Mapping[str, Any], taken_ms: int) -> Snapshot:
    """The items of every list in LISTS (by command) -> a Snapshot; SnapshotError on garbage."""
    items = {command: _items(raw, command) for command in LISTS}
    return Snapshot(
        taken_ms=taken_ms,
        vms=_by_id(items["listVirtualMachines"], _vm),
        routers=_by_id(items["listRouters"], _router),
        ips=_by_id(items["listPublicIpAddresses"], _ip),
        networks=_by_id(items["listNetworks"], _network),
        accounts=_by_id(items["listAccounts"], _account),
        domains=_by_id(items["listDomains"], _domain),
        offerings=_by_id(items["listServiceOfferings"], _offering),
        vlans=_by_id(items["listVlanIpRanges"], _vlan_range),
    )


def _items(raw: Mapping[str, Any], command: str) -> list[dict[str, Any]]:
    got = raw.get(command) if isinstance(raw, Mapping) else None
    if not isinstance(got, list) or not all(isinstance(item, dict) for item in got):
        raise SnapshotError(f"{command}: expected a list of objects, got {type(got).__name__}")
    return got


def _by_id(items: list[dict[str, Any]], build: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if not isinstance(item.get("id"), str) or not item["id"]:
            raise SnapshotError(f"an item has no id: {sorted(item)[:8]}")
        out[item["id"]] = build(item)
    return out


def _vm(d: dict[str, Any]) -> Vm:
    return Vm(
        d["id"], _s(d, "name"), _s(d, "state"), _s(d, "account"), _s(d, "domainid"), _s(d, "projectid"),
        _s(d, "serviceofferingid"), _int(d, "cpunumber"), _int(d, "memory"), _time(d, "created"),
        _s(d, "zoneid"), _custom(d), template=_s(d, "templateid"), cpu_speed=_int(d, "cpuspeed"),
        display=_bool(d, "displayvm", default=True),
    )  # fmt: skip


def _custom(d: dict[str, Any]) -> bool:
    """UserVmResponse.details holds cpuNumber / memory for a VM on a custom offering."""
    details = d.get("details")
    return isinstance(details, dict) and any(k in details for k in ("cpuNumber", "memory"))


def _router(d: dict[str, Any]) -> Router:
    return Router(
        d["id"], _s(d, "name"), _s(d, "state"), _s(d, "guestnetworkid"), _s(d, "vpcid"), _time(d, "created")
    )


def _ip(d: dict[str, Any]) -> PublicIp:
    return PublicIp(
        d["id"], _s(d, "ipaddress"), _s(d, "state"), _s(d, "account"), _s(d, "domainid"),
        _s(d, "projectid"), _time(d, "allocated"), _s(d, "zoneid"),
    )  # fmt: skip


def _network(d: dict[str, Any]) -> Network:
    return Network(
        d["id"], _s(d, "name"), _s(d, "account"), _s(d, "domainid"), _s(d, "projectid"), _s(d, "vpcid")
    )


def _account(d: dict[str, Any]) -> Account:
    return Account(d["id"], _s(d, "name"), _s(d, "domainid"))


def _domain(d: dict[str, Any]) -> Domain:
    return Domain(d["id"], _s(d, "name"), _s(d, "path"))


def _offering(d: dict[str, Any]) -> Offering:
    customized = d.get("iscustomized") is True
    return Offering(
        d["id"], _s(d, "name"), _int(d, "cpunumber"), _int(d, "memory"), customized, _int(d, "cpuspeed")
    )


def _vlan_range(d: dict[str, Any]) -> VlanRange:
    return VlanRange(d["id"], _s(d, "vlan"), _bool(d, "forvirtualnetwork", default=False), _s(d, "zoneid"))


def _s(d: dict[str, Any], key: str) -> str:
    value = d.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise SnapshotError(f"{key} of {d.get('id')} is a {type(value).__name__}, not text")
    return value


def _int(d: dict[str, Any], key: str) -> int | None:
    value = d.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SnapshotError(f"{key} of {d.get('id')} is not a whole number: {value!r}")
    return value


def _bool(d: dict[str, Any], key: str, *, default: bool) -> bool:
    value = d.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise SnapshotError(f"{key} of {d.get('id')} is not true or false: {value!r}")
    return value


def _time(d: dict[str, Any], key: str) -> int | None:
    """CloudStack's API dates, yyyy-MM-dd'T'HH:mm:ssZ (e.g. 2024-05-14T10:21:07+0000)."""
    text = _s(d, key)
    if not text:
        return None
    try:
        return parse_time(text)
    except BadInput as exc:
        raise SnapshotError(f"{key} of {d.get('id')}: {exc.message}") from None


_KINDS: dict[str, type] = {
    "vms": Vm, "routers": Router, "ips": PublicIp, "networks": Network, "accounts": Account,
    "domains": Domain, "offerings": Offering, "vlans": VlanRange,
}  # fmt: skip


def snapshot_to_json(snapshot: Snapshot) -> str:
    return json.dumps(asdict(snapshot), sort_keys=True, separators=(",", ":"))


def snapshot_from_json(text: str) -> Snapshot:
    doc = json.loads(text)
    parts = {
        # fields (and lists) a snapshot kept by an earlier release lacks take their defaults
        kind: {
            uuid: cls(**{f.name: item[f.name] for f in fields(cls) if f.name in item})
            for uuid, item in doc.get(kind, {}).items()
        }
        for kind, cls in _KINDS.items()
    }
    return Snapshot(taken_ms=doc["taken_ms"], **parts)
