"""Batches the spool's bound gave up, reported to its `on_drop` (the metrics' bytes lost to
billing): at once, or, for a batch the producer still held when it was dropped, once the producer
says whether it delivered it after all (a broker back after a long outage gets what librdkafka
held: those batches are billed, not lost).

    DroppedBatches(on_drop).wants_batch(frame) / .dropped(frame, batch) / .settle(frame, delivered=)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvmeter.agent.spool import Frame

log = logging.getLogger(__name__)


class DroppedBatches:
    def __init__(self, on_drop: Callable[[Frame, bytes], None] | None) -> None:
        self.on_drop = on_drop
        self._undecided: dict[tuple[int, int], tuple[Frame, bytes]] = {}  # by frame position

    def wants_batch(self, frame: Frame) -> bool:
        """Whether `dropped` needs the frame's batch (read back from the spool)."""
        return self.on_drop is not None or frame.handed

    def dropped(self, frame: Frame, batch: bytes) -> None:
        if frame.handed:  # counted once the producer says whether it delivered it
            self._undecided[frame.position] = (frame, batch)
        else:
            self._report(frame, batch)

    def settle(self, frame: Frame, *, delivered: bool) -> None:
        """What became of a batch the producer held: one dropped meanwhile counts as dropped
        only if it was not delivered."""
        if not self._undecided:
            return
        entry = self._undecided.pop(frame.position, None)
        if entry is None:
            return
        if delivered:
            log.warning(
                "spool: batch %s/%d, dropped at the bound while the producer held it, was delivered",
                frame.stream_id,
                frame.seq,
            )
            return
        self._report(*entry)

    def _report(self, frame: Frame, batch: bytes) -> None:
        if self.on_drop is None:
            return
        try:
            self.on_drop(frame, batch)
        except Exception:
            log.exception("spool: on_drop failed")
