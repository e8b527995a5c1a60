"""A double of CloudStack's management-server API (no real one runs here): an HTTP server on a
free port answering the list commands a reconciliation pass reads, as apache/cloudstack does.

Follows CloudStack's own source (the class named beside each rule):
- items carry the field names of the response classes (their @SerializedName values): VMs
  UserVmResponse, routers DomainRouterResponse, addresses IPAddressResponse, networks
  NetworkResponse, accounts AccountResponse, domains DomainResponse, offerings
  ServiceOfferingResponse; a null field is left out (Gson); dates as yyyy-MM-dd'T'HH:mm:ssZ.
- the envelope (ListResponse, ApiResponseSerializer): `{"<command lower-cased>response":
  {"count": total, "<object name>": [page]}}`, an empty list as `{"<command>response": {}}`;
  object names as the list commands set them (LISTS: virtualmachine, router, publicipaddress...).
- paging (BaseListCmd): `page` from 1 with `pagesize`; one without the other is error 431;
  pagesize above default.page.size (500) is 431; pagesize=-1 is every item (and page with it
  431); neither gives the first page of 500.
- whose resources (BaseListProjectAndAccountResourcesCmd): without listall=true only the
  caller's own account's; without projectid no project's, projectid=-1 those of every project
  only. listPublicIpAddresses without allocatedonly=false leaves free addresses out
  (ManagementServerImpl.searchForIPAddresses); `state` filters VMs, routers and addresses.
- listVlanIpRanges (ListVlanIpRangesCmd, root admin only, a BaseListCmd: no listall / projectid
  scope) lists the zone's IP ranges under "vlaniprange"; `vlan` is Vlan.getVlanTag ("vlan://100",
  "100" before the URIs, "untagged"), `forvirtualnetwork` true for a public range, false for a
  shared network's (ApiResponseHelper.createVlanIpRangeResponse).
- listVirtualMachines lists the VMs whose `displayvm` is the parameter's, true when not given,
  to root admins too (ListVMsCmd.getDisplay defaults to BaseListAccountResourcesCmd's true;
  QueryManagerImpl.searchForUserVMIdsAndCount filters on it). The caller here is a root admin,
  who may pass it.
- errors (ExceptionResponse, ApiServer.getSerializedApiError): `{"<name>": {"uuidList": [],
  "errorcode": N, "cserrorcode": C, "errortext": ...}}` with HTTP status N; an unknown command
  is 432 under "errorresponse", checked before the signature (ApiServer.verifyRequest); a bad
  signature is 401 under the command's response name.
- signatures (ApiServer.verifyRequest): the parameters but `signature`, sorted by name as sent,
  each value URL-encoded (java.net.URLEncoder, '+' as %20), joined with &, the whole lower-cased,
  HMAC-SHA1 with the secret key, base64; signatureVersion=3 needs an `expires` still to come.
Faults: `down` closes connections without an answer; `garbage` answers nonsense.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

from kvmeter.collector.cs_snapshot import LISTS

API_KEY = "operator-api-key"
SECRET = "operator-secret-key"
ROOT = "d0000000-0000-0000-0000-000000000001"
CALLER = "admin"  # the root admin account the key pair belongs to
DEFAULT_PAGE_SIZE = 500  # the default.page.size setting's default
# ApiErrorCode / CSExceptionErrorCode values used here
PARAM_ERROR, UNSUPPORTED_ACTION, UNAUTHORIZED = 431, 432, 401
CS_SERVER_API_EXCEPTION, CS_INVALID_PARAMETER = 9999, 4350
# Lists of BaseListProjectAndAccountResourcesCmd: listall, projectid
ACCOUNT_LISTS = frozenset({"listVirtualMachines", "listRouters", "listPublicIpAddresses", "listNetworks"})
STATE_LISTS = frozenset({"listVirtualMachines", "listRouters", "listPublicIpAddresses"})


def api_date(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S+0000")


def account(uuid: str, name: str, domain: str = ROOT) -> dict[str, Any]:
    """AccountResponse"""
    return {"id": uuid, "name": name, "accounttype": 0, "roletype": "User", "domainid": domain,
            "domain": "ROOT", "domainpath": "ROOT", "state": "enabled"}  # fmt: skip


def domain(uuid: str = ROOT, name: str = "ROOT", path: str = "ROOT") -> dict[str, Any]:
    """DomainResponse"""
    return {"id": uuid, "name": name, "level": 0, "path": path, "haschild": False, "state": "Active"}


def offering(
    uuid: str, name: str, cpu: int | None, memory: int | None, customized: bool = False
) -> dict[str, Any]:
    """ServiceOfferingResponse; a custom offering (cpu / memory None) has no cpunumber / memory
    (null, left out) and iscustomized true."""
    item: dict[str, Any] = {"id": uuid, "name": name, "displaytext": name, "cpuspeed": 1000,
                            "iscustomized": customized or cpu is None or memory is None,
                            "created": "2024-01-01T00:00:00+0000"}  # fmt: skip
    item.update({k: v for k, v in (("cpunumber", cpu), ("memory", memory)) if v is not None})
    return item


def vm(uuid: str, name: str, owner: str, state: str, offering_id: str, created_ms: int, cpu: int = 1,
       memory: int = 512, domain_id: str = ROOT, project_id: str = "",
       details: dict[str, str] | None = None, display: bool = True) -> dict[str, Any]:  # fmt: skip
    """UserVmResponse. `details` is the VM's own details (a custom offering's cpuNumber /
    cpuSpeed / memory are there); `display` its displayvm (updateVirtualMachine displayvm=false
    hides it from its owner)."""
    project = {"projectid": project_id, "project": "proj"} if project_id else {}
    item = {**project, "id": uuid, "name": name, "displayname": name, "account": owner, "domainid": domain_id,
            "domain": "ROOT", "created": api_date(created_ms), "state": state, "zoneid": "zone-1",
            "zonename": "zone1", "serviceofferingid": offering_id, "serviceofferingname": offering_id,
            "cpunumber": cpu, "cpuspeed": 1000, "memory": memory, "hypervisor": "KVM",
            "instancename": f"i-2-{zlib.crc32(uuid.encode()) % 1000}-VM", "nic": [],
            "displayvm": display}  # fmt: skip
    if details is not None:
        item["details"] = details
    return item


def custom_vm(uuid: str, name: str, owner: str, state: str, offering_id: str, created_ms: int, cpu: int,
              memory: int) -> dict[str, Any]:  # fmt: skip
    """A VM on a custom offering: its size is its own (details cpuNumber / memory), the offering's
    id stays when scaleVirtualMachine changes it."""
    details = {"cpuNumber": str(cpu), "cpuSpeed": "1000", "memory": str(memory)}
    return vm(uuid, name, owner, state, offering_id, created_ms, cpu, memory, details=details)


def router(
    uuid: str, name: str, network_id: str = "", vpc_id: str = "", created_ms: int = 0, owner: str = "system"
) -> dict[str, Any]:
    """DomainRouterResponse (a router's account is its network's owner, or system for a shared
    network's)."""
    item = {"id": uuid, "name": name, "state": "Running", "account": owner, "domainid": ROOT,
            "domain": "ROOT", "zoneid": "zone-1", "role": "VIRTUAL_ROUTER", "nic": [],
            "created": api_date(created_ms)}  # fmt: skip
    if network_id:
        item["guestnetworkid"] = network_id
    if vpc_id:
        item["vpcid"] = vpc_id
    return item


def network(uuid: str, name: str, owner: str, vpc_id: str = "", domain_id: str = ROOT) -> dict[str, Any]:
    """NetworkResponse"""
    item = {"id": uuid, "name": name, "account": owner, "domainid": domain_id, "domain": "ROOT",
            "type": "Isolated", "state": "Implemented", "zoneid": "zone-1"}  # fmt: skip
    if vpc_id:
        item["vpcid"] = vpc_id
    return item


def public_ip(uuid: str, address: str, owner: str, allocated_ms: int | None, state: str = "Allocated",
              domain_id: str = ROOT) -> dict[str, Any]:  # fmt: skip
    """IPAddressResponse (a free address has no `allocated` date)."""
    item = {"id": uuid, "ipaddress": address, "zoneid": "zone-1",
            "issourcenat": False, "account": owner, "domainid": domain_id, "domain": "ROOT",
            "forvirtualnetwork": True, "isstaticnat": False, "issystem": False, "state": state}  # fmt: skip
    if allocated_ms is not None and state != "Free":
        item["allocated"] = api_date(allocated_ms)
    return item


def vlan_range(uuid: str, vlan: str, public: bool = True, zone: str = "zone-1") -> dict[str, Any]:
    """VlanIpRangeResponse: a public range (forvirtualnetwork) or a shared network's."""
    return {"id": uuid, "forvirtualnetwork": public, "zoneid": zone, "vlan": vlan,
            "gateway": "203.0.113.1", "netmask": "255.255.255.0", "startip": "203.0.113.10",
            "endip": "203.0.113.200", "physicalnetworkid": "phys-1", "forsystemvms": False}  # fmt: skip


def empty_cloud() -> dict[str, list[dict[str, Any]]]:
    return {command: [] for command in LISTS}


def signature(params: list[tuple[str, str]], secret: str) -> str:
    """ApiServer.verifyRequest's signature of a request's parameters."""
    pairs = sorted((k, v) for k, v in params if k.lower() != "signature")
    text = "&".join(f"{k}={quote(v, safe='*-._').replace('~', '%7E')}" for k, v in pairs).lower()
    return base64.b64encode(hmac.new(secret.encode(), text.encode(), hashlib.sha1).digest()).decode()


def signature_problem(params: list[tuple[str, str]], secret: str, now_s: float) -> str | None:
    args = {k.lower(): v for k, v in params}
    if "signature" not in args or "apikey" not in args:
        return "missing signature or apiKey"
    if args.get("signatureversion") == "3":
        try:
            expires = dt.datetime.strptime(args.get("expires", ""), "%Y-%m-%dT%H:%M:%S%z")
        except ValueError:
            return "signature version 3 without a valid expires"
        if expires.timestamp() < now_s:
            return "request expired"
    if args["apikey"] != API_KEY:
        return "unknown apikey"
    if not hmac.compare_digest(signature(params, secret).encode(), args["signature"].encode()):
        return "signature mismatch"
    return None


class _Refused(Exception):
    def __init__(self, code: int, cs_code: int, text: str) -> None:
        super().__init__(text)
        self.code, self.cs_code, self.text = code, cs_code, text


class CloudStackApiDouble:
    """`cloud` maps each list command to its items; tests change it between passes."""

    def __init__(self, cloud: dict[str, list[dict[str, Any]]] | None = None, host: str = "127.0.0.1") -> None:
        self.cloud = cloud if cloud is not None else empty_cloud()
        self.down = False
        self.garbage = False
        self.requests: list[dict[str, str]] = []
        self.refused: list[str] = []
        double = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                double._answer(self, parse_qsl(urlsplit(self.path).query, keep_blank_values=True))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode()
                query = urlsplit(self.path).query
                double._answer(
                    self, parse_qsl(query, keep_blank_values=True) + parse_qsl(body, keep_blank_values=True)
                )

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.port = self.server.server_address[1]
        self.endpoint = f"http://{host}:{self.port}/client/api"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> CloudStackApiDouble:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _answer(self, h: BaseHTTPRequestHandler, pairs: list[tuple[str, str]]) -> None:
        if self.down:
            h.close_connection = True
            h.connection.close()
            return
        args = dict(pairs)
        self.requests.append(args)
        command = args.get("command", "")
        if command not in LISTS:  # before the signature, as verifyRequest does
            text = "The given command does not exist or it is not available for user"
            return self._error(
                h, "errorresponse", _Refused(UNSUPPORTED_ACTION, CS_SERVER_API_EXCEPTION, text)
            )
        name = f"{command.lower()}response"
        problem = signature_problem(pairs, SECRET, time.time())
        if problem is not None:
            self.refused.append(problem)
            text = "unable to verify user credentials and/or request signature"
            return self._send(
                h, UNAUTHORIZED, {name: {"uuidList": [], "errorcode": UNAUTHORIZED, "errortext": text}}
            )
        if self.garbage:
            return self._send(h, 200, {name: {"count": 2, LISTS[command]: "nonsense"}})
        try:
            items = self._select(command, args)
            chunk = self._page(items, args)
        except _Refused as exc:
            return self._error(h, name, exc)
        body: dict[str, Any] = {"count": len(items), LISTS[command]: chunk} if chunk else {}
        self._send(h, 200, {name: body})

    def _select(self, command: str, args: dict[str, str]) -> list[dict[str, Any]]:
        items = self.cloud.get(command, [])
        if command in ACCOUNT_LISTS:
            projects = args.get("projectid") == "-1"
            items = [i for i in items if bool(i.get("projectid")) == projects]
            if args.get("listall", "").lower() != "true" and not projects:
                items = [i for i in items if i.get("account") == CALLER and i.get("domainid") == ROOT]
        if command == "listPublicIpAddresses" and args.get("allocatedonly", "").lower() != "false":
            items = [i for i in items if i.get("allocated")]
        if command == "listVirtualMachines":
            display = args.get("displayvm", "true").lower() == "true"
            items = [i for i in items if i.get("displayvm", True) == display]
        if command in STATE_LISTS and args.get("state"):
            items = [i for i in items if str(i.get("state", "")).lower() == args["state"].lower()]
        return items

    @staticmethod
    def _page(items: list[dict[str, Any]], args: dict[str, str]) -> list[dict[str, Any]]:
        """BaseListCmd.validateSpecificParameters / getPageSize / getStartIndex."""
        page, size = args.get("page"), args.get("pagesize")
        try:
            page_n = int(page) if page is not None else None
            size_n = int(size) if size is not None else None
        except ValueError:
            raise _Refused(
                PARAM_ERROR, CS_INVALID_PARAMETER, "Unable to execute API command due to invalid value"
            ) from None
        if page_n is None and size_n is not None and size_n != -1:
            raise _Refused(
                PARAM_ERROR,
                CS_SERVER_API_EXCEPTION,
                '"page" parameter is required when "pagesize" is specified',
            )
        if size_n is None and page_n is not None:
            raise _Refused(
                PARAM_ERROR,
                CS_SERVER_API_EXCEPTION,
                '"pagesize" parameter is required when "page" is specified',
            )
        if size_n is not None and size_n > DEFAULT_PAGE_SIZE:
            text = f"Page size can't exceed max allowed page size value: {DEFAULT_PAGE_SIZE}"
            raise _Refused(PARAM_ERROR, CS_INVALID_PARAMETER, text)
        if size_n == -1:
            if page_n is not None:
                text = "Can't specify page parameter when pagesize is -1 (Unlimited)"
                raise _Refused(PARAM_ERROR, CS_INVALID_PARAMETER, text)
            return items
        size_n = size_n if size_n is not None else DEFAULT_PAGE_SIZE
        start = size_n * (page_n - 1) if page_n is not None and page_n > 0 else 0
        return items[start : start + size_n]

    def _error(self, h: BaseHTTPRequestHandler, name: str, exc: _Refused) -> None:
        body = {"uuidList": [], "errorcode": exc.code, "cserrorcode": exc.cs_code, "errortext": exc.text}
        self._send(h, exc.code, {name: body})

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, doc: Any) -> None:
        raw = json.dumps(doc).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json; charset=UTF-8")
        h.send_header("Content-Length", str(len(raw)))
        h.end_headers()
        h.wfile.write(raw)
