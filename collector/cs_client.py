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


class CloudStackApi:
    def __init__(self, endpoint: str, key: str, secret: str, timeout_s: float = 30.0) -> None:
        self.client = CloudStack(endpoint=endpoint, key=key, secret=secret, timeout=max(1, int(timeout_s)))

    def fetch(self) -> dict[str, Any]:
        """Every list of the pass, all pages, as CloudStack's items (dicts)."""
        raw: dict[str, Any] = {}
        for command in LISTS:
            try:
                raw[command] = getattr(self.client, command)(listall="true", fetch_list=True)
            except (CloudStackException, requests.RequestException) as exc:
                raise ApiUnavailable(f"{command}: {exc}") from None
            except (ValueError, TypeError, KeyError, AttributeError) as exc:  # a malformed envelope
                raise ApiUnavailable(f"{command}: unexpected answer: {exc!r}") from None
        return raw

    def snapshot(self, taken_ms: int) -> Snapshot:
        raw = self.fetch()
        try:
            return parse_snapshot(raw, taken_ms)
        except SnapshotError as exc:
            raise ApiUnavailable(f"unusable answer: {exc}") from None
