"""Measures to owners in memory (aggregate.Tally over the owner index), and their byte increments
written; the routes of decoded targets kept while the owner index stays the same.

    _attribute(measures, out, owner_at=None, batches=(), open_from=None) -> Attributed
    _write(conn, done, final_through, now, reason) -> (records, adjustments)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial

from sqlalchemy.engine import Connection

from kvmeter.collector import decode
from kvmeter.collector.aggregate import Attributed, Route, Tally
from kvmeter.collector.decode import Target
from kvmeter.collector.knowledge import LifecycleKnowledge
from kvmeter.collector.model import Measure, Outcome

ROUTES_KEPT = 250_000  # decoded Targets whose route is kept between chunks (decode keeps 200,000)


class Attributing(LifecycleKnowledge):
    _routes: dict[Target, Route | None]
    _routes_at: int

    def _attribute(
        self,
        measures: Iterable[Measure],
        out: Outcome,
        owner_at: Callable[[Measure], str | None] | None = None,
        *,
        batches: Iterable[decode.DecodedBatch] = (),
        open_from: int | None = None,
    ) -> Attributed:
        """In memory: byte increments summed per record key; measures to park / quarantine
        (aggregate.Tally). By the owner index unless `owner_at` says otherwise; `open_from` is the
        first window not yet final, where a stopped VM's bytes are doubted (attribution.py)."""
        window, billable = self.settings.window_ms, self.settings.billable
        if owner_at is None:
            if self._routes_at != self._knowledge or len(self._routes) > ROUTES_KEPT:
                self._routes, self._routes_at = {}, self._knowledge
            owner_of = partial(self.index.owner_at, open_from=open_from)
            tally = Tally(window, billable, owner_of, self.index.history, self._routes)
        else:
            tally = Tally(window, billable, owner_at)
        for batch in batches:
            tally.add_batch(batch)
        for m in measures:
            tally.add(m)
        result = tally.result()
        out.measures += result.measures
        out.billed_bytes += result.billed_bytes
        out.parked += len(result.parked)
        out.quarantined += len(result.quarantined)
        return result

    def _write(
        self, conn: Connection, done: Attributed, final_through: int, now: int, reason: str = "late bytes"
    ) -> tuple[int, int]:
        self.store.add_unbilled(conn, done.unbilled, now)
        return self.store.add_bytes(conn, done.billed, done.names, final_through, now, reason=reason)
