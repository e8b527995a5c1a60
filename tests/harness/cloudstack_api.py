"""A double of CloudStack's management-server API (no real one runs here): an HTTP server on a
free port answering the list commands a reconciliation pass reads.

Follows CloudStack's own source:
- responses: `{"<command lower-cased>response": {"count": N, "<item>": [...]}}`, an empty list
  as `{"<command>response": {}}`; items carry exactly the field names of the response classes
  (UserVmResponse, DomainRouterResponse, IPAddressResponse, NetworkResponse, AccountResponse,
  DomainResponse, ServiceOfferingResponse), dates as yyyy-MM-dd'T'HH:mm:ssZ;
- paging: `page` (from 1) and `pagesize` (BaseListCmd); projects: without `projectid` no
  project's resources, with `projectid=-1` only theirs (BaseListProjectAndAccountResourcesCmd);
- signed requests: apiKey + signature (HMAC-SHA1 of the sorted, lower-cased query), checked with
  the collector's own signature code; a bad signature is CloudStack's 401 error body.
Faults: `down` closes connections without an answer; `garbage` answers nonsense.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from kvmeter.collector.api_auth import cloudstack_signature_problem
from kvmeter.collector.cs_snapshot import LISTS

API_KEY = "operator-api-key"
SECRET = "operator-secret-key"
ROOT = "d0000000-0000-0000-0000-000000000001"


def api_date(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S+0000")


def account(uuid: str, name: str, domain: str = ROOT) -> dict[str, Any]:
    return {"id": uuid, "name": name, "accounttype": 0, "roletype": "User", "domainid": domain,
            "domain": "ROOT", "domainpath": "ROOT", "state": "enabled"}  # fmt: skip


def domain(uuid: str = ROOT, name: str = "ROOT", path: str = "ROOT") -> dict[str, Any]:
    return {"id": uuid, "name": name, "level": 0, "path": path, "haschild": False}


def offering(uuid: str, name: str, cpu: int, memory: int) -> dict[str, Any]:
    return {"id": uuid, "name": name, "displaytext": name, "cpunumber": cpu, "cpuspeed": 1000,
            "memory": memory, "iscustomized": False, "created": "2024-01-01T00:00:00+0000"}  # fmt: skip


def vm(uuid: str, name: str, owner: str, state: str, offering_id: str, created_ms: int, cpu: int = 1,
       memory: int = 512, domain_id: str = ROOT, project_id: str = "") -> dict[str, Any]:  # fmt: skip
    project = {"projectid": project_id, "project": "proj"} if project_id else {}
    return {**project, "id": uuid, "name": name, "displayname": name, "account": owner, "domainid": domain_id,
            "domain": "ROOT", "created": api_date(created_ms), "state": state, "zoneid": "zone-1",
            "zonename": "zone1", "serviceofferingid": offering_id, "serviceofferingname": offering_id,
            "cpunumber": cpu, "cpuspeed": 1000, "memory": memory, "hypervisor": "KVM",
            "instancename": f"i-2-{zlib.crc32(uuid.encode()) % 1000}-VM", "nic": []}  # fmt: skip


def router(
    uuid: str, name: str, network_id: str = "", vpc_id: str = "", created_ms: int = 0
) -> dict[str, Any]:
    item = {"id": uuid, "name": name, "state": "Running", "account": "system", "domainid": ROOT,
            "domain": "ROOT", "zoneid": "zone-1", "role": "VIRTUAL_ROUTER", "nic": [],
            "created": api_date(created_ms)}  # fmt: skip
    if network_id:
        item["guestnetworkid"] = network_id
    if vpc_id:
        item["vpcid"] = vpc_id
    return item


def network(uuid: str, name: str, owner: str, vpc_id: str = "", domain_id: str = ROOT) -> dict[str, Any]:
    item = {"id": uuid, "name": name, "account": owner, "domainid": domain_id, "domain": "ROOT",
            "type": "Isolated", "state": "Implemented", "zoneid": "zone-1"}  # fmt: skip
    if vpc_id:
        item["vpcid"] = vpc_id
    return item


def public_ip(uuid: str, address: str, owner: str, allocated_ms: int, state: str = "Allocated",
              domain_id: str = ROOT) -> dict[str, Any]:  # fmt: skip
    return {"id": uuid, "ipaddress": address, "allocated": api_date(allocated_ms), "zoneid": "zone-1",
            "issourcenat": False, "account": owner, "domainid": domain_id, "domain": "ROOT",
            "forvirtualnetwork": True, "isstaticnat": False, "issystem": False, "state": state}  # fmt: skip


def empty_cloud() -> dict[str, list[dict[str, Any]]]:
    return {command: [] for command in LISTS}


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
                double._answer(self, dict(parse_qsl(urlsplit(self.path).query, keep_blank_values=True)),
                               parse_qsl(urlsplit(self.path).query, keep_blank_values=True))  # fmt: skip

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

    def _answer(self, h: BaseHTTPRequestHandler, args: dict[str, str], pairs: list[tuple[str, str]]) -> None:
        if self.down:
            h.close_connection = True
            h.connection.close()
            return
        self.requests.append(args)
        command = args.get("command", "")
        known = {k.lower(): v for k, v in pairs}.get("apikey") == API_KEY
        problem = cloudstack_signature_problem(pairs, SECRET, time.time()) if known else "unknown apikey"
        if problem is not None:
            self.refused.append(problem)
            text = "unable to verify user credentials and/or request signature"
            error = {"uuidList": [], "errorcode": 401, "errortext": text}
            return self._send(h, 401, {f"{command.lower()}response": error})
        if self.garbage:
            return self._send(
                h, 200, {f"{command.lower()}response": {"count": 2, LISTS.get(command, "x"): "nonsense"}}
            )
        if command not in LISTS:
            return self._send(
                h, 431, {"errorresponse": {"errorcode": 431, "errortext": f"unknown command {command}"}}
            )
        items = self.cloud.get(command, [])
        # BaseListProjectAndAccountResourcesCmd: without projectid no project's resources;
        # projectid=-1 those of every project only.
        projects = args.get("projectid") == "-1"
        items = [i for i in items if bool(i.get("projectid")) == projects]
        page, size = int(args.get("page", "1")), int(args.get("pagesize", "500"))
        chunk = items[(page - 1) * size : page * size]
        body: dict[str, Any] = {"count": len(items), LISTS[command]: chunk} if chunk else {}
        self._send(h, 200, {f"{command.lower()}response": body})

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, doc: Any) -> None:
        raw = json.dumps(doc).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json; charset=UTF-8")
        h.send_header("Content-Length", str(len(raw)))
        h.end_headers()
        h.wfile.write(raw)
