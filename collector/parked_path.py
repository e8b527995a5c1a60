"""Parked measures: billed when an owner becomes known, reported as UNATTRIBUTED past the horizon
(they stay parked; a later owner takes the bytes over from UNATTRIBUTED).

    _unpark_for(resources) / _unpark(instances=, macs=, addresses=) -> Outcome
    _report_unattributed() -> Outcome
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kvmeter.collector.attributing import Attributing
from kvmeter.collector.model import UNATTRIBUTED, Measure, Outcome


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
        self, *, instances: Iterable[str] = (), macs: Iterable[str] = (), addresses: Iterable[str] = ()
    ) -> Outcome:
        """Bill parked measures that now have an owner: delete from parked and add the bytes in
        one transaction (a parked row is locked, so two replicas bill it once)."""
        out = Outcome()
        after = 0
        while True:
            now = self.clock()
            with self.store.write() as conn:
                final_through = self.store.finalized_through(conn)
                rows = self.store.take_parked(
                    conn, instances=instances, macs=macs, addresses=addresses, after_id=after
                )
                if not rows:
                    break
                after = rows[-1][0]
                self._restore_measures(conn, (m for _, m, _ in rows))
                owned = [(row_id, m, told) for row_id, m, told in rows if self.index.owner_at(m) is not None]
                if owned:
                    part = Outcome()
                    done = self._attribute((m for _, m, _ in owned), part)
                    # Bytes already reported as unattributed move to their owner.
                    moved = self._attribute((m for _, m, told in owned if told), Outcome(), _unattributed)
                    for mine, theirs in ((done.billed, moved.billed), (done.unbilled, moved.unbilled)):
                        for key, amount in theirs.items():
                            mine[key] = mine.get(key, 0) - amount
                    self.store.delete_parked(conn, [row_id for row_id, _, _ in owned])
                    written, adjusted = self._write(conn, done, final_through, now, "late attribution")
                    out.unparked += len(owned)
                    out.billed_bytes += part.billed_bytes
                    out.records += written
                    out.adjustments += adjusted
        return out

    def _report_unattributed(self) -> Outcome:
        """Parked past the horizon: add the bytes to usage under UNATTRIBUTED (never a guessed
        owner); the measures stay parked and move to their owner if one is ever known."""
        out = Outcome()
        while True:
            now = self.clock()
            with self.store.write() as conn:
                final_through = self.store.finalized_through(conn)
                rows = self.store.take_unreported(conn, now - self.settings.park_horizon_ms)
                if not rows:
                    break
                done = self._attribute((m for _, m in rows), Outcome(), _unattributed)
                written, adjusted = self._write(conn, done, final_through, now, "unattributed")
                self.store.mark_reported(conn, [row_id for row_id, _ in rows], now)
                out.unattributed += len(rows)
                out.records += written
                out.adjustments += adjusted
        return out


def _unattributed(_measure: Measure) -> str:
    return UNATTRIBUTED
