"""The thin adapter to CloudStack's API: one pass's list commands through the `cs` client
(signed requests, paging with page / pagesize), into a Snapshot.

    CloudStackApi(endpoint, key, secret, timeout_s).snapshot(taken_ms) -> Snapshot
Raises ApiUnavailable for anything short of a complete, well-formed answer.
"""

from __future__ import annotations

import re
from typing import Any

import requests
from cs import CloudStack, CloudStackException

from kvmeter.collector.cs_snapshot import LISTS, ApiUnavailable, Snapshot, SnapshotError, parse_snapshot

__all__ = ["ApiUnavailable", "CloudStackApi"]

PROJECT_LISTS = frozenset({"listVirtualMachines", "listRouters", "listPublicIpAddresses", "listNetworks"})
# BaseListCmds without `listall` (root admin only): CloudStack would log it as an unknown
# parameter on every pass (ParamGenericValidationWorker); they list the whole zone anyway.
UNSCOPED_LISTS = frozenset({"listVlanIpRanges"})
PAGE_SIZE = 500  # CloudStack's default.page.size default (and the `cs` client's)
READS = 3  # reads of a list that keeps changing while it is paged before the pass is given up
# The signed query the `cs` client sends by GET, quoted by requests' errors ("Max retries exceeded
# with url: /client/api?...apiKey=...&signature=..."): never in a log, nor in /health.
_SIGNED = re.compile(r"(?i)\b(apikey|signature|expires|sessionkey)=[^&\s'\")]*")


def _redacted(text: str) -> str:
    return _SIGNED.sub(r"\1=<redacted>", text)


class CloudStackApi:
    def __init__(self, endpoint: str, key: str, secret: str, timeout_s: float = 30.0) -> None:
        self.client = CloudStack(endpoint=endpoint, key=key, secret=secret, timeout=max(1, int(timeout_s)))

    def fetch(self) -> dict[str, Any]:
        """Every list of the pass, all pages, as CloudStack's items (dicts). Lists of resources
        projects may own are read twice: `listall` alone leaves project resources out, and
        `projectid=-1` lists only those (a project's VM missing would look destroyed). VMs are
        read twice more, with `displayvm=false` (hidden VMs)."""
        raw: dict[str, Any] = {}
        for command in LISTS:
            scopes: list[dict[str, str]] = [{}, {"projectid": "-1"}] if command in PROJECT_LISTS else [{}]
            if command == "listVirtualMachines":
                # Without `displayvm` CloudStack lists displayed VMs only, to root admins too
                # (ListVMsCmd.getDisplay defaults to true; QueryManagerImpl filters on it): a
                # hidden VM would look destroyed, or stay billed while its host runs it.
                scopes += [{**scope, "displayvm": "false"} for scope in scopes]
            raw[command] = [item for scope in scopes for item in self._list(command, **scope)]
        return raw

    def _list(self, command: str, **params: str) -> Any:
        try:
            for _ in range(READS):
                items = self._read(command, params)
                if items is not None:
                    return items
        except (CloudStackException, requests.RequestException) as exc:
            raise ApiUnavailable(_redacted(f"{command}: {exc}")) from None
        except (ValueError, TypeError, KeyError, AttributeError) as exc:  # a malformed envelope
            raise ApiUnavailable(_redacted(f"{command}: unexpected answer: {exc!r}")) from None
        raise ApiUnavailable(f"{command}: the list changed while it was paged, {READS} reads in a row")

    def _read(self, command: str, params: dict[str, str]) -> list[Any] | None:
        """Every page of one list; None when it changed while it was paged. Each page is its own
        query (BaseListCmd: offset and limit, QueryManagerImpl orders VMs by id): an item removed
        meanwhile slides a later one onto a page already read. So a count that differs between
        pages, or pages that end short of (or beyond) the count CloudStack announced, is no
        complete list: what is missing from it must not look gone."""
        key = LISTS[command]
        items: list[Any] = []
        announced: int | None = None
        page = 1
        while True:
            scope = {} if command in UNSCOPED_LISTS else {"listall": "true"}
            data = getattr(self.client, command)(**scope, page=page, pagesize=PAGE_SIZE, **params)
            if not isinstance(data, dict):
                raise TypeError(f"a {type(data).__name__}, not an object")
            chunk = data.get(key) or []
            if not isinstance(chunk, list):
                raise TypeError(f"{key} is a {type(chunk).__name__}, not a list")
            if not chunk:  # `{}`: nothing on this page
                return items if len(items) == (announced or 0) else None
            count = data.get("count")
            if isinstance(count, bool) or not isinstance(count, int):
                raise ValueError(f"count {count!r}")
            if announced is not None and count != announced:
                return None
            announced = count
            items.extend(chunk)
            if len(items) >= count:
                return items if len(items) == count else None
            page += 1

    def snapshot(self, taken_ms: int) -> Snapshot:
        raw = self.fetch()
        try:
            return parse_snapshot(raw, taken_ms)
        except SnapshotError as exc:
            raise ApiUnavailable(f"unusable answer: {exc}") from None
