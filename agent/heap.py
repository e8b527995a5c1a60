"""The C heap between polls (glibc only; elsewhere nothing is done): what a poll frees, the next
poll reuses, up to a bound; the rest goes back to the kernel.

A poll allocates and frees the same few MB every time (its batch and the copies librdkafka
makes of it, the counter columns, the encoder's lists). Handed back to the kernel after each
poll, every page of it is faulted in again by the next one: ~450 minor faults per poll at
2,000 interfaces, each about 3.5 µs of the poll thread's CPU on a virtual machine, plus the
trim's own 0.3-0.4 ms. So glibc is told to keep up to KEEP_BYTES of freed memory at the top of
each heap (M_TRIM_THRESHOLD; glibc would otherwise adapt it to the largest chunk freed and trim
at each poll) and to serve blocks below that from the heap rather than fresh mappings
(M_MMAP_THRESHOLD); whatever a bigger poll frees beyond it is still handed back at once, and a
full trim every TRIM_EVERY_S seconds returns freed memory caught between live blocks, which no
threshold reaches.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 4 << 20
TRIM_EVERY_S = 60.0


def _libc() -> Any:
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim  # noqa: B018  (glibc's: absent from other C libraries)
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


class Heap:
    """`keep()` once at start; `release()` after start; `after_poll()` after each poll."""

    def __init__(
        self,
        *,
        keep_bytes: int = KEEP_BYTES,
        trim_every: float = TRIM_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
        libc: Any = None,
    ) -> None:
        self._libc = libc if libc is not None else _libc()
        self.keep_bytes = keep_bytes
        self.trim_every = trim_every
        self._clock = clock
        self._trimmed_at: float | None = None

    def keep(self) -> None:
        """Set the thresholds (for the whole process: they are glibc's)."""
        if self._libc is None:
            return
        for parameter in (M_TRIM_THRESHOLD, M_MMAP_THRESHOLD):
            if not self._libc.mallopt(parameter, self.keep_bytes):
                log.debug("mallopt(%d) refused", parameter)

    def release(self) -> None:
        """Hand every freed page back to the kernel now (all arenas: ~0.4 ms)."""
        if self._libc is not None:
            self._libc.malloc_trim(0)
        self._trimmed_at = self._clock()

    def after_poll(self) -> None:
        if self._trimmed_at is None or self._clock() - self._trimmed_at >= self.trim_every:
            self.release()
