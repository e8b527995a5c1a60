"""Measure batches: decode -> drop what the stream mark says is applied -> attribute -> byte
increments / park / quarantine / dead letters, all of it and the new marks in ONE transaction
(exactly-once effect).

    apply_batches(records) -> Outcome
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sqlalchemy.engine import Connection

from kvmeter.collector import decode
from kvmeter.collector.errors import BadInput
from kvmeter.collector.isolation import isolating
from kvmeter.collector.model import DeadLetter, Measure, Outcome, Record
from kvmeter.collector.parked_path import ParkedMeasures
from kvmeter.collector.pruned_measures import pruned_letters
from kvmeter.collector.public_vlans import Placements
from kvmeter.collector.store import reconciliation
from kvmeter.collector.streams import admit, irregular

MEASURES = "measures"


class MeasuresPath(ParkedMeasures):
    placements: Placements  # the agents' NICs: host, VLAN, type (the reconciler checks them)

    def apply_batch(self, value: bytes, origin: str = "") -> Outcome:
        return self.apply_batches([Record(value, None, origin)])

    def apply_batches(self, records: Sequence[Record]) -> Outcome:
        """Apply measure batches in one transaction; returns what happened."""
        return isolating(self.store, self.clock, MEASURES, records, self._apply_batches)

    def _apply_batches(self, records: Sequence[Record]) -> Outcome:
        out = Outcome()
        decoded: list[decode.DecodedBatch] = []
        origins: dict[tuple[str, int], str] = {}
        for rec in records:
            try:
                decoded.append(decode.decode_batch(rec.value))
                origins[decoded[-1].stream_id, decoded[-1].seq] = rec.origin
            except BadInput as exc:
                out.dead_letters.append(DeadLetter(MEASURES, rec.origin, rec.value, exc.reason, exc.message))
        self.sync()
        now = self.clock()
        streams = {b.stream_id: b.host_id for b in decoded}
        decoded.sort(key=lambda b: (b.stream_id, b.seq))
        with self.store.read() as conn:
            self._recall(conn, decoded)
        learned = self._learn_hints(decoded)
        witnessed = self._witness_changes(decoded)
        try:
            with self.store.write() as conn:
                reconciliation.save_witness(conn, witnessed)
                if learned:
                    self.store.save_owner_hints(conn, learned, now)
                final_through = self.store.finalized_through(conn)
                marks = self.store.lock_marks(conn, streams)
                gaps = self.store.gaps_of(conn, irregular(decoded, marks))
                admitted, new_marks, changed_gaps, out.duplicates = admit(decoded, marks, gaps)
                out.batches = len(admitted)
                self._restore_for(conn, admitted)
                done = self._attribute((), out, batches=admitted, open_from=final_through)
                out.records, out.adjustments = self._write(conn, done, final_through, now)
                self.store.park(conn, self._park_or_letter(conn, done.parked, origins, out), now)
                self.store.quarantine(conn, done.quarantined, now)
                self.store.dead_letter(conn, out.dead_letters, now)
                self.store.set_marks(conn, new_marks, now)
                self.store.set_gaps(conn, changed_gaps)
        except BaseException:
            # Not stored: memory must not say it is, or the chunk applied again (isolation.py,
            # the feed's retry) finds nothing new and these hints never reach the store.
            for key in learned:
                self.hints.pop(key, None)
            for domain in witnessed:
                self.witness.pop(domain, None)
            raise
        self.placements.observe(admitted, now)
        if learned:  # measures parked for want of these owners (by uuid; a bare name: all)
            named_only = any(not dom.uuid for b in decoded for dom in b.inventory if dom.name in learned)
            out.add(self._unpark() if named_only else self._unpark(instances=sorted(learned)))
        return out

    def _park_or_letter(
        self, conn: Connection, parked: list[Measure], origins: Mapping[tuple[str, int], str], out: Outcome
    ) -> list[Measure]:
        """The measures to park; those of a pruned resource's past are dead letters (pruned_measures)."""
        if not parked:
            return parked
        tombstones = self.store.tombstones(conn, {m.instance_uuid for m in parked if m.instance_uuid})
        if not tombstones:
            return parked
        keep, letters, nbytes = pruned_letters(parked, tombstones, origins)
        out.parked -= len(parked) - len(keep)
        out.dead_letters.extend(letters)
        out.pruned_bytes += nbytes
        return keep
