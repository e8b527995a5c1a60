"""Parked measures: billed when an owner becomes known, reported as UNATTRIBUTED past the horizon
(they stay parked; a later owner takes the bytes over from UNATTRIBUTED). A parked measure the
store refuses to bill (a record's sum past int64) is dead-lettered, never retried for ever.

    _unpark_for(resources) / _unpark(instances=, macs=, addresses=, closing=) -> Outcome
    _report_unattributed() -> Outcome
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial

from sqlalchemy.engine import Connection

from kvmeter.collector.attributing import Attributing
from kvmeter.collector.isolation import REFUSED, UNSTORABLE, refusal
from kvmeter.collector.model import UNATTRIBUTED, DeadLetter, Measure, Outcome
from kvmeter.collector.store.parking import measure_json

PAGE = 5000  # parked measures per transaction


class ParkedMeasures(Attributing):
    def _unpark_for(self, resources: Sequence[str], per_pass: int = 500) -> Outcome:
        """Bill parked measures of these resources (by instance, MAC or address) now that their
        lifecycle is known."""
        out = Outcome()
        known = [r for r in resources if r in self.histories]
        for start in range(0, len(known), per_pass):
            instances, macs, addresses = [], [], []
            for resource in known[start : start + per_pass]:
                history = self.histories[resource]
                instances.append(resource)
                macs.extend(history.macs)
                addresses.extend([*history.addresses, *(seg.address for seg in history.ip if seg.address)])
            out.add(self._unpark(instances=instances, macs=macs, addresses=addresses))
        return out

    def _unpark(
        self,
        *,
        instances: Iterable[str] = (),
        macs: Iterable[str] = (),
        addresses: Iterable[str] = (),
        closing: int | None = None,
    ) -> Outcome:
        """Bill parked measures that now have an owner: delete from parked and add the bytes in
        one transaction (a parked row is locked, so two replicas bill it once). `closing`: the
        windows ending by then are about to be made final: only their measures, which a
        stopped VM's history no longer holds back (attribution.py)."""
        out = Outcome()
        take = partial(
            self.store.take_parked, instances=instances, macs=macs, addresses=addresses, start_before=closing
        )
        after = [0]  # the last row looked at: rows left parked are not taken again
        trying: list[tuple[int, Measure]] = []  # the rows a page is billing

        def page(limit: int) -> bool:
            now = self.clock()
            trying.clear()
            with self.store.write() as conn:
                final_through = self.store.finalized_through(conn)
                open_from = final_through if closing is None else max(final_through, closing)
                rows = take(conn, after_id=after[0], limit=limit)
                if not rows:
                    return False
                self._restore_measures(conn, (m for _, m, _ in rows))
                owned = [
                    (row_id, m, told)
                    for row_id, m, told in rows
                    if self.index.owner_at(m, open_from) is not None
                ]
                if owned:
                    part = Outcome()
                    done = self._attribute((m for _, m, _ in owned), part, open_from=open_from)
                    # Bytes already reported as unattributed move to their owner.
                    moved = self._attribute((m for _, m, told in owned if told), Outcome(), _unattributed)
                    for mine, theirs in ((done.billed, moved.billed), (done.unbilled, moved.unbilled)):
                        for key, amount in theirs.items():
                            mine[key] = mine.get(key, 0) - amount
                    trying[:] = [(row_id, m) for row_id, m, _ in owned]
                    self.store.delete_parked(conn, [row_id for row_id, _ in trying])
                    written, adjusted = self._write(conn, done, final_through, now, "late attribution")
            after[0] = rows[-1][0]
            if owned:
                out.unparked += len(owned)
                out.billed_bytes += part.billed_bytes
                out.records += written
                out.adjustments += adjusted
            return True

        def letter_first(exc: BaseException) -> None:  # the page of one measure that failed
            with self.store.write() as conn:
                self._letter(conn, trying, exc, out)

        self._paged(page, letter_first)
        return out

    def _report_unattributed(self) -> Outcome:
        """Parked past the horizon: add the bytes to usage under UNATTRIBUTED (never a guessed
        owner); the measures stay parked and move to their owner if one is ever known."""
        out = Outcome()

        def page(limit: int) -> bool:
            now = self.clock()
            with self.store.write() as conn:
                final_through = self.store.finalized_through(conn)
                rows = self.store.take_unreported(conn, now - self.settings.park_horizon_ms, limit)
                if not rows:
                    return False
                done = self._attribute((m for _, m in rows), Outcome(), _unattributed)
                written, adjusted = self._write(conn, done, final_through, now, "unattributed")
                self.store.mark_reported(conn, [row_id for row_id, _ in rows], now)
            out.unattributed += len(rows)
            out.records += written
            out.adjustments += adjusted
            return True

        def letter_first(exc: BaseException) -> None:
            with self.store.write() as conn:
                rows = self.store.take_unreported(conn, self.clock() - self.settings.park_horizon_ms, 1)
                self._letter(conn, rows, exc, out)

        self._paged(page, letter_first)
        return out

    @staticmethod
    def _paged(page: Callable[[int], bool], letter_first: Callable[[BaseException], None]) -> None:
        """`page(limit)` until it finds nothing. Bytes the store cannot add (a record's sum past
        int64: each measure alone was valid) must not fail every tick (the feed retries a tick
        in place, before any input is polled again): a page the store refuses is taken again a
        measure at a time, and the measure the store refuses alone is dead-lettered."""
        limit = PAGE
        while True:
            try:
                if not page(limit):
                    return
            except REFUSED as exc:
                if limit == 1:
                    letter_first(exc)
                    limit = PAGE
                else:
                    limit = 1

    def _letter(
        self, conn: Connection, rows: Sequence[tuple[int, Measure]], exc: BaseException, out: Outcome
    ) -> None:
        """Parked measures the store refuses to bill: dead letters (UNSTORABLE), parked no more."""
        now = self.clock()
        for row_id, m in rows:
            origin = f"parked:{m.stream_id}/{m.seq}#{m.index}"
            letter = DeadLetter("measures", origin, measure_json(m).encode(), UNSTORABLE, refusal(exc))
            self.store.dead_letter(conn, [letter], now)
            self.store.delete_parked(conn, [row_id])
            out.dead_letters.append(letter)


def _unattributed(_measure: Measure) -> str:
    return UNATTRIBUTED
