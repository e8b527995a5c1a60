"""Input the database itself refuses (a value too long for PostgreSQL, ...) must not stop the
pipeline: a chunk is applied record by record and the refused one dead-lettered (UNSTORABLE).

    isolating(store, clock, source, records, apply) -> Outcome
    REFUSED / refusal(exc) -> str   # what the database's refusals are, and their text
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sqlalchemy.exc import DataError, IntegrityError

from kvmeter.collector.model import DeadLetter, Outcome, Record
from kvmeter.collector.store import Store

UNSTORABLE = "unstorable"  # dead-letter reason: the database refused the record's values
REFUSED = (DataError, IntegrityError, OverflowError)  # Overflow: sqlite3 binding past int64


def refusal(exc: BaseException) -> str:
    """The database's own words for a refusal (the driver's error, not SQLAlchemy's wrapper)."""
    return str(getattr(exc, "orig", None) or exc)[:1000]


def isolating(
    store: Store,
    clock: Callable[[], int],
    source: str,
    records: Sequence[Record],
    apply: Callable[[Sequence[Record]], Outcome],
) -> Outcome:
    """Input the database itself refuses (a value too long for PostgreSQL, ...) must not
    stop the pipeline: apply the chunk record by record and dead-letter the refused one."""
    try:
        return apply(records)
    except REFUSED as exc:
        if not records:  # what the input stores with them (Delivery.within) failed: not a record's fault
            raise
        if len(records) > 1:
            out = Outcome()
            for rec in records:
                out.add(isolating(store, clock, source, [rec], apply))
            return out
        rec = records[0]
        letter = DeadLetter(source, rec.origin, rec.value, UNSTORABLE, refusal(exc), rec.key)
        with store.write() as conn:
            store.dead_letter(conn, [letter], clock())
        return Outcome(dead_letters=[letter])
