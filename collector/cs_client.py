"""The thin adapter to CloudStack's API: one pass's list commands through the `cs` client
(signed requests, paging with page / pagesize), into a Snapshot.

    CloudStackApi(endpoint, key, secret, timeout_s).snapshot(taken_ms) -> Snapshot
Raises ApiUnavailable for anything short of a complete, well-formed answer.
"""

from __future__ import annotations

from typing import Any

import requests
from cs import CloudStack, CloudStackException

from kvmeter.collector.cs_snapshot import LISTS, ApiUnavailable, Snapshot, SnapshotError, parse_snapshot

__all__ = ["ApiUnavailable", "CloudStackApi"]

PROJECT_LISTS = frozenset({"listVirtualMachines", "listRouters", "listPublicIpAddresses", "listNetworks"})


class CloudStackApi:
    def __init__(self, endpoint: str, key: str, secret: str, timeout_s: float = 30.0) -> None:
        self.client = CloudStack(endpoint=endpoint, key=key, secret=secret, timeout=max(1, int(timeout_s)))

    def fetch(self) -> dict[str, Any]:
        """Every list of the pass, all pages, as CloudStack's items (dicts). Lists of resources
        projects may own are read twice: `listall` alone leaves project resources out, and
        `projectid=-1` lists only those (a project's VM missing would look destroyed)."""
        raw: dict[str, Any] = {}
        for command in LISTS:
            items = self._list(command)
            if command in PROJECT_LISTS:
                items = [*items, *self._list(command, projectid="-1")]
            raw[command] = items
        return raw

    def _list(self, command: str, **params: str) -> Any:
        try:
            return getattr(self.client, command)(listall="true", fetch_list=True, **params)
        except (CloudStackException, requests.RequestException) as exc:
            raise ApiUnavailable(f"{command}: {exc}") from None
        except (ValueError, TypeError, KeyError, AttributeError) as exc:  # a malformed envelope
            raise ApiUnavailable(f"{command}: unexpected answer: {exc!r}") from None

    def snapshot(self, taken_ms: int) -> Snapshot:
        raw = self.fetch()
        try:
            return parse_snapshot(raw, taken_ms)
        except SnapshotError as exc:
            raise ApiUnavailable(f"unusable answer: {exc}") from None
