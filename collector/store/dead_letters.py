"""Dead letters: input the collector could not use, kept with its bytes, its Kafka key, where it
came from and why; listed, shown and marked when re-driven (collector/redrive.py). A letter is
never deleted here: a retry that succeeds marks it resolved."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from kvmeter.collector.model import DeadLetter
from kvmeter.collector.schema import dead_letters
from kvmeter.collector.store.engine import StoreCore

LETTER_STATES = ("open", "resolved", "all")


@dataclass(frozen=True)
class StoredLetter:
    id: int
    source: str  # "measures" | "lifecycle"
    origin: str
    reason: str
    message: str
    size: int  # bytes of raw
    created_ms: int
    retries: int
    retried_ms: int | None
    resolved_ms: int | None
    raw: bytes = b""  # only from dead_letter_by_id
    key: bytes | None = None

    @property
    def state(self) -> str:
        return "open" if self.resolved_ms is None else "resolved"


def letter_digest(source: str, raw: bytes) -> str:
    """A redelivery of the same bytes is not a new letter."""
    return hashlib.sha256(source.encode() + b"\0" + raw).hexdigest()


class DeadLetters(StoreCore):
    def dead_letter(self, conn: Connection, letters: Sequence[DeadLetter], now_ms: int) -> None:
        if not letters:
            return
        stmt = self._insert(dead_letters).on_conflict_do_nothing(index_elements=["digest"])
        rows = [
            {
                "digest": letter_digest(d.source, d.raw),
                "source": d.source,
                "origin": d.origin[:256],
                "raw": d.raw,
                "record_key": d.key,
                "reason": d.reason[:64],
                "message": d.message,
                "created_ms": now_ms,
                "retries": 0,
            }
            for d in letters
        ]
        conn.execute(stmt, rows)

    def dead_letters(
        self, *, state: str = "open", source: str | None = None, after_id: int = 0, limit: int = 100
    ) -> list[StoredLetter]:
        """Letters with ids above `after_id`, oldest first, without their bytes."""
        if state not in LETTER_STATES:
            raise ValueError(f"state must be one of {LETTER_STATES}")
        dl = dead_letters.c
        query = sa.select(*_SUMMARY).where(dl.id > after_id).order_by(dl.id).limit(limit)
        if state != "all":
            query = query.where(dl.resolved_ms.is_(None) if state == "open" else dl.resolved_ms.is_not(None))
        if source is not None:
            query = query.where(dl.source == source)
        with self.read() as conn:
            return [_letter(row) for row in conn.execute(query)]

    def dead_letter_by_id(self, letter_id: int) -> StoredLetter | None:
        dl = dead_letters.c
        with self.read() as conn:
            row = conn.execute(sa.select(*_SUMMARY, dl.raw, dl.record_key).where(dl.id == letter_id)).first()
        if row is None:
            return None
        raw, key = row[-2:]
        return _letter(row, bytes(raw), None if key is None else bytes(key))

    def dead_letter_retried(
        self, conn: Connection, letter_id: int, now_ms: int, failure: DeadLetter | None
    ) -> None:
        """Count a retry: resolved when it succeeded, else still open with the new reason."""
        dl = dead_letters.c
        values: dict[str, object] = {"retries": dl.retries + 1, "retried_ms": now_ms}
        if failure is None:
            values["resolved_ms"] = now_ms
        else:
            values.update(reason=failure.reason[:64], message=failure.message)
        conn.execute(
            sa.update(dead_letters).where(dl.id == letter_id, dl.resolved_ms.is_(None)).values(**values)
        )


_SUMMARY = (
    dead_letters.c.id,
    dead_letters.c.source,
    dead_letters.c.origin,
    dead_letters.c.reason,
    dead_letters.c.message,
    sa.func.length(dead_letters.c.raw),
    dead_letters.c.created_ms,
    dead_letters.c.retries,
    dead_letters.c.retried_ms,
    dead_letters.c.resolved_ms,
)


def _letter(row: Row, raw: bytes = b"", key: bytes | None = None) -> StoredLetter:
    return StoredLetter(
        int(row[0]), row[1], row[2], row[3], row[4], int(row[5] or 0), int(row[6]), int(row[7]),
        None if row[8] is None else int(row[8]), None if row[9] is None else int(row[9]), raw, key,
    )  # fmt: skip
