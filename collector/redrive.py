"""Re-driving dead letters: a stored letter goes through the live path again, once its cause is
fixed (a raised size limit, a newer kvmeter that reads it, a database that takes its values).

    Redriver(store, settings[, clock]).retry(letter_id) -> Retried | None

The letter's bytes (and Kafka key) are applied by Collector.apply_events / apply_batches, the
code the consumer runs, so a retry is as idempotent as a redelivery: an event is stored once by
its digest, a batch once by its stream mark, and retrying twice bills once. The letter is never
deleted: a retry that succeeds marks it resolved; one that fails again keeps it open with the
new reason. Applying and marking are two transactions: a crash between them leaves the letter
open, and the next retry finds its input already applied and resolves it.

One Collector per Redriver, built on first use and kept (its histories follow the store like
another replica's), behind a lock: the API's threads retry one letter at a time.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvmeter.collector.model import DeadLetter, Outcome, Record, Settings
from kvmeter.collector.pruned_measures import RESOURCE_PRUNED
from kvmeter.collector.report import iso
from kvmeter.collector.service import LIFECYCLE, Collector
from kvmeter.collector.store import Store, StoredLetter
from kvmeter.collector.store.engine import now_ms

RESOLVED = "resolved"  # applied now
FAILED = "failed"  # refused again: still a dead letter, with the new reason
ALREADY_RESOLVED = "already_resolved"  # resolved before: nothing applied
PRUNED_FOR_GOOD = (
    "its resource's lifecycle events were pruned: no owner can be found, and its windows are not "
    "reopened; kept as evidence of the bytes"
)


@dataclass(frozen=True)
class Retried:
    letter: StoredLetter  # as it is after the retry
    result: str  # RESOLVED | FAILED | ALREADY_RESOLVED
    applied: Outcome


class Redriver:
    def __init__(self, store: Store, settings: Settings, clock: Callable[[], int] = now_ms):
        self.store = store
        self.settings = settings
        self.clock = clock
        self._collector: Collector | None = None
        self._lock = threading.Lock()

    def retry(self, letter_id: int) -> Retried | None:
        """Apply a dead letter through the live path; None when there is no such letter."""
        with self._lock:
            letter = self.store.dead_letter_by_id(letter_id)
            if letter is None:
                return None
            if letter.resolved_ms is not None:
                return Retried(letter, ALREADY_RESOLVED, Outcome())
            if self._collector is None:
                self._collector = Collector(self.store, self.settings, self.clock)
            record = Record(letter.raw, letter.key, letter.origin)
            out = Outcome()
            if letter.reason == RESOURCE_PRUNED:
                # Its resource's history is gone for good (pruned_measures.py): nothing to apply.
                failure: DeadLetter | None = DeadLetter(
                    letter.source, letter.origin, letter.raw, letter.reason, PRUNED_FOR_GOOD, letter.key
                )
            else:
                if letter.source == LIFECYCLE:
                    out = self._collector.apply_events([record])
                else:
                    out = self._collector.apply_batches([record])
                failure = next(
                    (d for d in out.dead_letters if d.raw == letter.raw and d.source == letter.source), None
                )
            with self.store.write() as conn:
                self.store.dead_letter_retried(conn, letter_id, self.clock(), failure)
            after = self.store.dead_letter_by_id(letter_id)
            assert after is not None  # letters are never deleted by a retry
            return Retried(after, FAILED if failure else RESOLVED, out)


def letter_dict(letter: StoredLetter, *, with_raw: bool = False) -> dict[str, Any]:
    """A letter as JSON (API and CLI): the bytes, when asked for, as base64 and, when they are
    UTF-8 text, as text too."""
    out: dict[str, Any] = {
        "id": letter.id,
        "state": letter.state,
        "source": letter.source,
        "origin": letter.origin,
        "reason": letter.reason,
        "message": letter.message,
        "size": letter.size,
        "created": iso(letter.created_ms),
        "retries": letter.retries,
        "retried": None if letter.retried_ms is None else iso(letter.retried_ms),
        "resolved": None if letter.resolved_ms is None else iso(letter.resolved_ms),
    }
    if with_raw:
        out["key"] = None if letter.key is None else letter.key.decode("utf-8", "replace")
        out["raw_base64"] = base64.b64encode(letter.raw).decode()
        try:
            out["raw_text"] = letter.raw.decode("utf-8")
        except UnicodeDecodeError:
            out["raw_text"] = None
    return out


def retried_dict(done: Retried) -> dict[str, Any]:
    out = done.applied
    return {
        "result": done.result,
        "letter": letter_dict(done.letter),
        "applied": {
            "events": out.events, "known_events": out.known_events, "batches": out.batches,
            "duplicates": out.duplicates, "billed_bytes": out.billed_bytes, "records": out.records,
        },
    }  # fmt: skip
