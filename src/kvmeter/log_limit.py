"""A logging filter that passes one line per distinct message per interval (agent and collector).

librdkafka retries an unreachable broker every few tens of milliseconds and logs each failure;
through this filter an outage of an hour is a line per distinct error per minute, each saying
how many like it were held back. Messages are told apart with their numbers masked (ports,
durations and counters vary from line to line of the same error).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

_NUMBERS = re.compile(r"[0-9]+")


class RateLimit(logging.Filter):
    def __init__(
        self,
        interval_s: float = 60.0,
        *,
        max_kinds: int = 1000,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        super().__init__()
        self.interval_s = interval_s
        self.max_kinds = max_kinds
        self.monotonic = monotonic
        self._kinds: dict[tuple[int, str], tuple[float, int]] = {}  # -> (last passed, held back since)

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.levelno, _NUMBERS.sub("#", record.getMessage()))
        now = self.monotonic()
        passed, held = self._kinds.get(key, (float("-inf"), 0))
        if now - passed < self.interval_s:
            self._kinds[key] = (passed, held + 1)
            return False
        if len(self._kinds) >= self.max_kinds and key not in self._kinds:
            self._kinds.pop(next(iter(self._kinds)))  # the oldest kind
        self._kinds[key] = (now, 0)
        if held:
            record.msg = f"{record.getMessage()} ({held} more like this in the last {self.interval_s:g} s)"
            record.args = None
        return True


def limited_logger(name: str, interval_s: float = 60.0) -> logging.Logger:
    """The logger `name` with a RateLimit filter (added once)."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, RateLimit) for f in logger.filters):
        logger.addFilter(RateLimit(interval_s))
    return logger
