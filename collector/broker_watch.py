"""Whether the Kafka cluster is reachable, and since when not: what /health reports.

Fed from librdkafka's callbacks on the consumer thread: statistics (a broker in state UP means
reachable), errors (all brokers down means unreachable) and messages received (reachable). The
cluster is unreachable while no client reaches it; before the first contact it counts as
unreachable since the watch began, so a collector that never connects turns degraded too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

ALL_BROKERS_DOWN = "_ALL_BROKERS_DOWN"


class BrokerWatch:
    def __init__(self, degraded_after_s: float = 60.0, monotonic: Callable[[], float] = time.monotonic):
        self.degraded_after_s = degraded_after_s
        self.monotonic = monotonic
        self._reaches: dict[str, bool] = {}  # client -> reaches a broker now
        self._down_since: float | None = monotonic()
        self.last_error = ""

    def seen(self, client: str, *, reachable: bool) -> None:
        was_up = self._down_since is None
        self._reaches[client] = reachable
        if any(self._reaches.values()):
            self._down_since = None
        elif was_up:
            self._down_since = self.monotonic()

    def on_error(self, client: str, name: str, text: str) -> None:
        """An error event (KafkaError's name and text)."""
        self.last_error = f"{name}: {text}"
        if name == ALL_BROKERS_DOWN:
            self.seen(client, reachable=False)

    def on_stats(self, client: str, stats_json: str) -> None:
        """librdkafka's statistics: reachable when any broker connection is UP."""
        try:
            brokers = json.loads(stats_json).get("brokers", {})
        except (ValueError, AttributeError):
            return
        self.seen(client, reachable=any(b.get("state") == "UP" for b in brokers.values()))

    def unreachable_s(self) -> float | None:
        return None if self._down_since is None else self.monotonic() - self._down_since

    def degraded(self) -> str:
        """Why the collector is degraded, "" while it is not."""
        down = self.unreachable_s()
        if down is None or down < self.degraded_after_s:
            return ""
        why = f" (last error {self.last_error})" if self.last_error else ""
        return f"no Kafka broker reachable for {down:.0f} s (limit {self.degraded_after_s:g} s){why}"

    def status(self) -> dict[str, Any]:
        down = self.unreachable_s()
        return {
            "reachable": down is None,
            "unreachable_seconds": None if down is None else round(down, 1),
            "last_error": self.last_error,
        }
