"""Calls into a library that may hang (libvirt does during migrations), each on a helper thread
that the caller gives up on after a timeout, with at most a few left stuck at once: the caller
never waits longer than its timeout, and a hung library cannot pile up threads."""

from __future__ import annotations

import logging
import threading
from typing import Callable, Generic, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class BoundedCalls(Generic[T]):
    """`call(work, timeout, what)`: work()'s result, or None when it did not answer within
    `timeout` seconds or `limit` earlier calls are still stuck (`timeouts` counts both)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.timeouts = 0
        self._lock = threading.Lock()
        self._in_flight = 0

    def call(self, work: Callable[[], T | None], timeout: float, what: str) -> T | None:
        with self._lock:
            if self._in_flight >= self.limit:
                self.timeouts += 1
                return None
            self._in_flight += 1
        result: list[T | None] = []
        done = threading.Event()

        def run() -> None:
            try:
                result.append(work())
            finally:
                with self._lock:
                    self._in_flight -= 1
                done.set()

        threading.Thread(target=run, name="kvmeter-bounded-call", daemon=True).start()
        if not done.wait(timeout):
            with self._lock:
                self.timeouts += 1
            log.warning("%s did not answer within %.1f s", what, timeout)
            return None
        return result[0] if result else None
