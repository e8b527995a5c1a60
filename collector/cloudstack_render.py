"""CloudStack's API responses: usage records as UsageRecordResponse, list and error bodies as
CloudStack's ApiResponseSerializer writes them, in JSON or XML.

Pure: rows and directory facts in, text out. Field names and their order follow
UsageRecordResponse (apache/cloudstack api/.../response/UsageRecordResponse.java); a field kvmeter
does not know is left out, as Gson leaves out nulls. List bodies are built piece by piece, so a
response of any length streams without being held whole.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from itertools import islice
from typing import Any, NamedTuple
from xml.sax.saxutils import escape

from kvmeter.collector.model import (
    ALLOCATED_VM,
    IP_ADDRESS,
    NETWORK_BYTES_RECEIVED,
    NETWORK_BYTES_SENT,
    RUNNING_VM,
    UsageKey,
)
from kvmeter.collector.usage import rawusage
from kvmeter.collector.vm_size import parse_size

JSON_CONTENT_TYPE = "application/json; charset=UTF-8"  # ApiServer's json.content.type default
XML_CONTENT_TYPE = "text/xml; charset=UTF-8"  # HttpUtils.XML_CONTENT_TYPE

# UsageTypes.listUsageTypes(): (id, name, description) of the types kvmeter meters.
USAGE_TYPES = (
    (RUNNING_VM, "RUNNING_VM", "Running Vm Usage"),
    (ALLOCATED_VM, "ALLOCATED_VM", "Allocated Vm Usage"),
    (IP_ADDRESS, "IP_ADDRESS", "IP Address Usage"),
    (NETWORK_BYTES_SENT, "NETWORK_BYTES_SENT", "Network Usage (Bytes Sent)"),
    (NETWORK_BYTES_RECEIVED, "NETWORK_BYTES_RECEIVED", "Network Usage (Bytes Received)"),
)

# CSExceptionErrorCode of the exception behind an error (utils/.../CSExceptionErrorCode.java).
CS_INVALID_PARAMETER = 4350
CS_PERMISSION_DENIED = 4365
CS_SERVER_API = 9999
_CHUNK = 500


@dataclass(frozen=True)
class Owner:
    """What CloudStack's <metadata> told about an account (any field may be unknown: "")."""

    account_name: str = ""
    domain_id: str = ""
    domain_name: str = ""
    domain_path: str = ""
    project_id: str = ""
    project_name: str = ""


@dataclass(frozen=True)
class Instance:
    """What CloudStack told about a resource (a VM, a router, an address): its <metadata>, and
    its API through the reconciler's last pass."""

    zone_id: str = ""
    cpu_cores: int | None = None
    memory_mb: int | None = None
    tags: tuple[tuple[str, str], ...] = ()
    name: str = ""
    template_id: str = ""
    cpu_speed: int | None = None  # MHz
    network_id: str = ""  # a router's guest network
    network_name: str = ""
    vpc_id: str = ""  # a VPC router's VPC
    owner: str = ""  # the account uuid that owns the resource now (its <metadata>, CloudStack's API)


@dataclass(frozen=True)
class ServiceOffering:
    """A service offering as CloudStack's API listed it (cpu and memory None: a dynamic one)."""

    name: str = ""
    cpu: int | None = None
    memory_mb: int | None = None
    cpu_speed: int | None = None  # MHz


NO_OWNER, NO_INSTANCE, NO_OFFERING = Owner(), Instance(), ServiceOffering()


class RecordFacts(NamedTuple):
    """One usage record with what is known of its owner and resource (a NamedTuple: one is
    built per record of every page)."""

    key: UsageKey
    quantity: int
    resource_name: str = ""
    device_type: str = ""
    owner: Owner = NO_OWNER
    instance: Instance = NO_INSTANCE
    offering: ServiceOffering = NO_OFFERING  # the record's offering (key.offering)


@lru_cache(maxsize=4096)  # a page shares few windows: each date is formatted once
def cloudstack_date(ms: int) -> str:
    """CloudStack's API date `yyyy-MM-dd'T'HH:mm:ssZ`, e.g. 2023-07-20T19:59:59+0000."""
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S+0000")


def usage_record(rec: RecordFacts, *, include_tags: bool = False, old_format: bool = False) -> dict[str, Any]:
    """One `usagerecord`, its fields in UsageRecordResponse's order (Gson writes a class's own
    fields first, then its superclass's `tags`), those kvmeter does not know left out."""
    k, owner, vm, offering = rec.key, rec.owner, rec.instance, rec.offering
    raw = rawusage(k.usage_type, rec.quantity)
    name = rec.resource_name or vm.name or k.resource
    is_vm_time = k.usage_type in (RUNNING_VM, ALLOCATED_VM)
    is_bytes = k.usage_type in (NETWORK_BYTES_SENT, NETWORK_BYTES_RECEIVED)
    device = (rec.device_type or "UserVm") if is_bytes else None
    # A router's bytes are its network's (CloudStack's user_statistics): the VPC's on public
    # traffic of a VPC router, else the guest network's (ApiResponseHelper.createUsageResponse).
    vpc_id = vm.vpc_id if device == "DomainRouter" and k.detail == "public" else ""
    network_id = vm.network_id if device == "DomainRouter" and not vpc_id else ""
    # oldformat=true: the usage server's own text (NetworkUsageParser, VMInstanceUsageParser,
    # IPAddressUsageParser), uuids for its database ids
    if is_bytes:
        verb = "sent" if k.usage_type == NETWORK_BYTES_SENT else "received"
        usage = f"{rec.quantity} bytes {verb}"
        description = f"Bytes {verb} by {name} ({k.resource}) on {k.detail or 'unknown'} traffic"
        if old_format:  # its host id is the device's (the VM's or router's) id
            description = f"network bytes {verb} for Host: {k.resource}"
        elif network_id:
            description += f" of network {vm.network_name or network_id} ({network_id})"
    elif is_vm_time:
        usage = f"{raw} Hrs"
        state = "running" if k.usage_type == RUNNING_VM else "allocated"
        if old_format:
            what = "running time" if k.usage_type == RUNNING_VM else "allocated"
            description = (
                f"{name} {what} (ServiceOffering: {k.offering or 'unknown'}) "
                f"(Template: {vm.template_id or 'unknown'})"
            )
        else:
            description = f"{state.capitalize()} VM usage for {name} ({k.resource})"
            if k.offering:
                shown = f"{offering.name} ({k.offering})" if offering.name else k.offering
                description += f" using service offering {shown}"
    else:
        usage = f"{raw} Hrs"
        description = f"IPAddress: {name}" if old_format else f"IP address usage for {name} ({k.resource})"
    out: dict[str, Any] = dict(_owner_fields(k.account, owner))  # few owners a page: built once each
    if vm.zone_id:
        out["zoneid"] = vm.zone_id
    out["description"] = description
    out["usage"] = usage
    out["usagetype"] = k.usage_type
    out["rawusage"] = raw
    if is_vm_time or device == "UserVm":
        out["virtualmachineid"] = k.resource
    if is_vm_time and (rec.resource_name or vm.name):
        out["name"] = rec.resource_name or vm.name
    elif network_id and vm.network_name:  # CloudStack names a router's record by its network
        out["name"] = vm.network_name
    if is_vm_time and k.offering:
        out["offeringid"] = k.offering
    if is_vm_time and vm.template_id:
        out["templateid"] = vm.template_id
    out["usageid"] = k.resource
    if is_vm_time or device:  # hypervisor for VM time, device for bytes; none for an address
        out["type"] = "KVM" if is_vm_time else device
    if is_vm_time:
        # As CloudStack: the record's own size (a custom offering's VM), else the offering's;
        # kvmeter's last resort is the VM's current size (its <metadata>, CloudStack's API).
        own = parse_size(k.detail)
        cpu, memory = own or (offering.cpu, offering.memory_mb)
        cpu = vm.cpu_cores if cpu is None else cpu
        memory = vm.memory_mb if memory is None else memory
        speed = offering.cpu_speed if offering.cpu_speed is not None else vm.cpu_speed
        if cpu is not None:
            out["cpunumber"] = cpu
        if speed is not None:
            out["cpuspeed"] = speed
        if memory is not None:
            out["memory"] = memory
    out["startdate"] = cloudstack_date(k.window_start_ms)
    out["enddate"] = cloudstack_date(k.window_end_ms - 1000)  # start + range - 1 s, like CloudStack
    if network_id:
        out["networkid"] = network_id
    if vpc_id:
        out["vpcid"] = vpc_id
    # UsageRecordResponse starts with an empty tag set: Gson writes "tags": [] unless filled.
    out["tags"] = (
        [{"key": tk, "value": tv, "resourcetype": "UserVm", "resourceid": k.resource} for tk, tv in vm.tags]
        if include_tags
        else []
    )
    return out


@lru_cache(maxsize=1024)
def _owner_fields(account: str, owner: Owner) -> tuple[tuple[str, str], ...]:
    """UsageRecordResponse's owner fields, in its order, the unknown ones left out."""
    fields = (
        ("account", owner.account_name or account),
        ("accountid", account),
        ("projectid", owner.project_id),
        ("project", owner.project_name),
        ("domainid", owner.domain_id),
        ("domain", owner.domain_name),
        ("domainpath", owner.domain_path),
    )
    return tuple((name, value) for name, value in fields if value)


def usage_type_records() -> list[dict[str, Any]]:
    return [{"id": i, "name": n, "description": d} for i, n, d in USAGE_TYPES]


# -- bodies -----------------------------------------------------------------------------------


def list_body(
    response_name: str, object_name: str, count: int, records: Iterable[Mapping[str, Any]], *, xml: bool
) -> Iterator[str]:
    """A ListResponse as ApiResponseSerializer writes it, in pieces. `count` is omitted when 0
    (and then the JSON body is `{}`); a page past the end carries the count alone."""
    if xml:
        yield f'<?xml version="1.0" encoding="UTF-8"?><{response_name} cloud-stack-version="{VERSION}">'
        if count:
            yield f"<count>{count}</count>"
        for rec in records:
            yield _xml_object(object_name, rec)
        yield f"</{response_name}>"
        return
    yield f'{{"{response_name}":{{'
    if count:
        yield f'"count":{count}'
    first = True
    items = iter(records)
    while chunk := list(islice(items, _CHUNK)):  # one encoder call per chunk, not per record
        text = json.dumps(chunk, ensure_ascii=False, separators=(",", ":"))[1:-1]
        if first:
            yield f'{"," if count else ""}"{object_name}":[{text}'
            first = False
        else:
            yield "," + text
    yield "}}" if first else "]}}"


def error_body(response_name: str, code: int, cs_code: int | None, text: str, *, xml: bool) -> str:
    """ExceptionResponse: errorcode is the HTTP status too (ApiServlet); cs_code None leaves
    cserrorcode out, as Gson leaves out a null (ApiServer's error without an exception)."""
    if xml:
        cs = "" if cs_code is None else f"<cserrorcode>{cs_code}</cserrorcode>"
        return (
            f'<?xml version="1.0" encoding="UTF-8"?><{response_name} cloud-stack-version="{VERSION}">'
            f"<errorcode>{code}</errorcode>{cs}"
            f"<errortext>{_xml_text(text)}</errortext></{response_name}>"
        )
    body: dict[str, Any] = {"uuidList": [], "errorcode": code, "cserrorcode": cs_code, "errortext": text}
    if cs_code is None:
        del body["cserrorcode"]
    return json.dumps({response_name: body}, ensure_ascii=False, separators=(",", ":"))


def _xml_object(name: str, fields: Mapping[str, Any]) -> str:
    parts = [f"<{name}>"]
    for key, value in fields.items():
        if isinstance(value, list):  # a collection: one element per member, named by the field
            parts.extend(_xml_object(key, member) for member in value)
        else:
            parts.append(f"<{key}>{_xml_text(_java_string(value))}</{key}>")
    parts.append(f"</{name}>")
    return "".join(parts)


def _java_string(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


# Characters XML 1.0 allows in no form, not even as a character reference (its Char production):
# C0 controls but tab, LF and CR, and U+FFFE / U+FFFF. CR is kept as a reference, else a parser
# reads it as LF.
_NOT_XML_CHAR = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _xml_text(text: str) -> str:
    """ApiResponseSerializer.escapeSpecialXmlChars: the five XML specials; and, unlike it, what XML
    1.0 forbids (a control character in a tag, a name or an echoed parameter) replaced by U+FFFD,
    so that the document stays well-formed for every client."""
    escaped = escape(text, {'"': "&quot;", "'": "&apos;", "\r": "&#13;"})
    return _NOT_XML_CHAR.sub("\ufffd", escaped)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"kvmeter-{version('kvmeter')}"
    except PackageNotFoundError:  # running from a source tree without an install
        return "kvmeter"


VERSION = _version()
