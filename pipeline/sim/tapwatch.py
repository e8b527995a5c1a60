"""The taps of a network namespace as the kernel announces them: `LinkWatch(ns)` records every
RTM_NEWLINK / RTM_DELLINK of a `vnetN` link there, with the counters the message carries. A
tap's RTM_DELLINK carries its final counters in both directions, so the deletions recorded are
each tap's whole life: the ground truth of what its VM sent and received.

The watcher runs in the namespace as a child process (pyroute2); its own socket, not the agent's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

# Run inside the host's namespace: every RTM_NEWLINK/RTM_DELLINK of a tap, as JSON lines.
_WATCH = r"""
import json, sys
from pyroute2 import IPRoute
with IPRoute() as ipr:
    ipr.bind()
    print(json.dumps({"ready": True}), flush=True)
    while True:
        for msg in ipr.get():
            event = msg.get("event")
            if event not in ("RTM_NEWLINK", "RTM_DELLINK") or msg["family"] == 7:
                continue  # AF_BRIDGE (7): a port joining or leaving its bridge, no counters
            name = msg.get_attr("IFLA_IFNAME") or ""
            if not name.startswith("vnet"):
                continue
            stats = msg.get_attr("IFLA_STATS64") or {}
            print(json.dumps({
                "event": event, "ifname": name, "ifindex": msg["index"],
                "mac": msg.get_attr("IFLA_ADDRESS"),
                "rx_bytes": stats.get("rx_bytes"), "tx_bytes": stats.get("tx_bytes"),
                "at": __import__("time").monotonic(),
            }), flush=True)
"""


@dataclass(frozen=True)
class TapRecord:
    """One link message of a tap, host side: rx = what the VM sent, tx = what it received."""

    event: str
    ifname: str
    ifindex: int
    mac: str
    rx_bytes: int | None
    tx_bytes: int | None
    at: float


class LinkWatch:
    """The tap link messages of namespace ``ns`` since start(), in order."""

    def __init__(self, ns: str):
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", _WATCH],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        if "ready" not in self.proc.stdout.readline():
            raise RuntimeError(f"the link watch in {ns} did not start")
        self.records: list[TapRecord] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, name="linkwatch", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.records.append(TapRecord(**json.loads(line)))

    def deleted(self) -> list[TapRecord]:
        with self._lock:
            return [r for r in self.records if r.event == "RTM_DELLINK"]

    def wait_deleted(self, ifindex: int, timeout: float = 30.0) -> TapRecord:
        found: list[TapRecord] = []

        def gone() -> bool:
            found[:] = [r for r in self.deleted() if r.ifindex == ifindex]
            return bool(found)

        deadline = time.monotonic() + timeout
        while not gone():
            if time.monotonic() > deadline:
                raise RuntimeError(f"tap ifindex {ifindex} not deleted within {timeout} s")
            time.sleep(0.05)
        return found[0]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self._thread.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
