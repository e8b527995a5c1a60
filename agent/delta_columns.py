"""The delta engine's column paths: polls that take every steady counter in C-level passes over
whole columns instead of a Python step per counter (`ColumnPolls`, a part of DeltaEngine), and
the last steady poll's counters kept as columns between polls.

They are accelerators only: whatever they conclude, DeltaEngine.poll_readings concludes for the
same readings (tests/unit/test_delta_columns.py, test_delta_mixed.py, test_delta_newborn.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence, Set
from itertools import compress, repeat
from operator import attrgetter, eq, ge, le, mul, ne, not_, or_, sub
from typing import TYPE_CHECKING, Any

from kvmeter.agent.counter_rows import CounterRow, LastReadings, SteadyColumns, counter_row
from kvmeter.agent.model import ColumnDeltas, CounterKey, Delta

if TYPE_CHECKING:
    from kvmeter.agent.delta import DeltaConfig, Stats

_NAME = attrgetter("name")
_IFINDEX = attrgetter("ifindex")
_BOOT_ID = attrgetter("boot_id")


class ColumnPolls:
    """DeltaEngine's column paths and the state they keep (see the module's docstring)."""

    boot_id: str
    config: DeltaConfig
    _fresh: bool
    _counters: dict[CounterKey, CounterRow]
    _created: dict[CounterKey, int]
    _closed: set[CounterKey]
    _held: set[CounterKey]
    _preexisting: set[CounterKey]
    _last_poll: tuple[int, int] | None
    _steady: SteadyColumns | None  # more tracked counters, as columns
    # Keys of _steady that a final sample took out of it (their rows are in the per-key dict,
    # or closed): the other steady counters stay columns (see _lift)
    _lifted: set[CounterKey]
    _steady_index: dict[CounterKey, int] | None  # _steady's key -> position

    # The engine's rules by rows (kvmeter.agent.delta.DeltaEngine)
    def _poll_rows(
        self,
        now_ms: int,
        mono_ms: int,
        readings: Iterable[tuple[CounterKey, Stats]],
        present: Iterable[CounterKey] | None,
    ) -> list[Delta]:
        raise NotImplementedError

    def _present_set(
        self, present: Iterable[CounterKey] | None, read: Iterable[CounterKey]
    ) -> Set[CounterKey]:
        raise NotImplementedError

    def _age_absent(self, present: Set[CounterKey], read: Iterable[CounterKey]) -> None:
        raise NotImplementedError

    def poll_columns(
        self,
        now_ms: int,
        mono_ms: int,
        keys: Sequence[CounterKey],
        rx_bytes: list[int],
        rx_packets: list[int],
        tx_bytes: list[int],
        tx_packets: list[int],
        present: Iterable[CounterKey] | None = None,
    ) -> ColumnDeltas | None:
        """The steady poll, by columns: what poll_readings would conclude when every key is
        tracked, was last read at the same instant, and only grew within the ceiling (one
        C-level pass per column instead of a Python step per counter). Returns None, having
        changed nothing, whenever that does not hold; the caller then polls by rows. The engine
        keeps the four lists as the counters' last readings: the caller must not change them.

        The counters of a steady poll stay as columns until the next poll by rows (SteadyColumns): a
        host's next poll is nearly always steady again, and then nothing is looked up per key."""
        if self._fresh or not keys:
            return None
        steady = self._steady
        old_rxb: Sequence[int]
        old_txb: Sequence[int]
        old_rxp: Sequence[int]
        old_txp: Sequence[int]
        if steady is not None and not self._lifted and (keys is steady.keys or keys == steady.keys):
            # The same counters as the last steady poll: their last readings are at hand.
            keys, ifindexes, names, old_rxb, old_txb, old_rxp, old_txp, start, last_mono = steady
        else:
            self._settle()
            try:
                rows = list(map(self._counters.__getitem__, keys))
            except KeyError:
                return None  # a new counter: the rules for unknown keys apply
            ifindexes, names, old_rxb, old_txb, old_rxp, old_txp, ends, monos = zip(*rows)
            start, last_mono = ends[0], monos[0]
            if ends.count(start) != len(ends) or monos.count(last_mono) != len(monos):
                return None
        rxb = list(map(sub, rx_bytes, old_rxb))
        txb = list(map(sub, tx_bytes, old_txb))
        rxp = list(map(sub, rx_packets, old_rxp))
        txp = list(map(sub, tx_packets, old_txp))
        elapsed = max(mono_ms - last_mono, self.config.min_elapsed_ms)
        max_bytes = self.config.line_rate_ceiling_bps * elapsed // 8000
        if min(rxb) < 0 or min(txb) < 0 or min(rxp) < 0 or min(txp) < 0:
            return None  # a wrap or a reset
        if max(rxb) > max_bytes or max(txb) > max_bytes:
            return None  # to be quarantined
        end = now_ms if now_ms > start else start + 1
        keys = tuple(keys)
        if steady is None or keys is not steady.keys:
            counters = self._counters
            for key in keys:
                del counters[key]
        self._set_steady(
            SteadyColumns(keys, ifindexes, names, rx_bytes, tx_bytes, rx_packets, tx_packets, end, mono_ms)
        )
        self._age_absent(self._present_set(present, keys), keys)
        self._last_poll = (now_ms, mono_ms)
        return ColumnDeltas(keys, start, end, rxb, txb, rxp, txp)

    def poll_mixed(
        self,
        now_ms: int,
        mono_ms: int,
        keys: Sequence[CounterKey],
        rx_bytes: list[int],
        rx_packets: list[int],
        tx_bytes: list[int],
        tx_packets: list[int],
        present: Set[CounterKey],
        *,
        newborn_columns: bool = False,
    ) -> tuple[ColumnDeltas, list[Delta]] | None:
        """A poll where most counters are steady and a few are not (a VM storm: taps replaced
        since the last poll): the steady ones by columns, the rest by rows, with every rule of
        poll_readings. A counter goes by columns when it is tracked, was last read at the same
        instant as the last steady poll's (or, without one, as the first tracked one), and all
        four of its counters grew within the ceiling: exactly the counters poll_readings would
        take its fast path for. Returns (the column deltas over all `keys`, zeros where a key
        went by rows; the rows' deltas), or None, having changed nothing, when no counter
        qualifies or nothing was baselined yet.

        The last readings come from the last steady poll's columns by position (C-level
        passes), the few other tracked counters from the per-key dict.

        `newborn_columns`: the counters born since the last poll (a storm's new taps) that
        poll_readings would count from zero over the steady counters' very interval go by
        columns too (see _born_since); the same deltas and state, no Python step each.

        When every counter goes by columns, the engine keeps the four lists as their last
        readings (as poll_columns does): the caller must not change them."""
        if self._fresh or not keys:
            return None
        old = LastReadings(self._steady, self._index() if self._steady is not None else {}, self._lifted)
        # The keys after the lead (old.lead: those that lead are steady counters, in order) and
        # their positions in `old`
        pos = old.positions(keys)
        lead = old.lead
        after = keys[lead:]
        missing = list(compress(range(len(pos)), map(eq, pos, repeat(old.unknown))))
        counters = self._counters
        from_dict = []  # positions in `after` of counters read from the per-key dict
        if counters:
            found: list[Any] = list(map(counters.get, map(after.__getitem__, missing)))
            for i, row in compress(zip(missing, found), found):  # (None: not in the dict)
                if old.take(row):
                    pos[i] = len(old.rx_bytes) - 1
                    from_dict.append(i)
        if old.start is None or old.mono_ms is None:
            return None  # nothing tracked
        start, last_mono = old.start, old.mono_ms
        if newborn_columns and len(from_dict) < len(missing):
            for i in self._born_since(now_ms, after, old, missing, pos):
                pos[i] = old.born
        known = [*repeat(1, lead), *map(ne, pos, repeat(old.unknown))]
        rxb = list(map(sub, rx_bytes, old.column("rx_bytes", pos)))
        txb = list(map(sub, tx_bytes, old.column("tx_bytes", pos)))
        rxp = list(map(sub, rx_packets, old.column("rx_packets", pos)))
        txp = list(map(sub, tx_packets, old.column("tx_packets", pos)))
        max_bytes = (
            self.config.line_rate_ceiling_bps * max(mono_ms - last_mono, self.config.min_elapsed_ms) // 8000
        )
        # 1 where a counter goes by columns: known, nothing decreased, no jump over the ceiling
        if min(rxb) >= 0 and min(txb) >= 0 and min(rxp) >= 0 and min(txp) >= 0:
            if max(rxb) <= max_bytes and max(txb) <= max_bytes:
                columns = known  # every known one (a storm): no Python-level call each
            else:
                columns = list(map(mul, known, map(ge, repeat(max_bytes), map(max, rxb, txb))))
        else:
            columns = list(
                map(
                    mul,
                    map(mul, known, map(le, repeat(0), map(min, rxb, txb, rxp, txp))),
                    map(ge, repeat(max_bytes), map(max, rxb, txb)),
                )
            )
        if not any(columns):
            return None
        every = all(columns)  # a storm's usual case: no counter by rows, no pass to pick them
        by_rows: list[tuple[CounterKey, Stats]] = []
        if every:
            steady_keys = tuple(keys)
            kept = rx_bytes, tx_bytes, rx_packets, tx_packets
        else:
            rows = list(map(not_, columns))
            by_rows = list(
                zip(
                    compress(keys, rows),
                    zip(
                        compress(rx_bytes, rows),
                        compress(rx_packets, rows),
                        compress(tx_bytes, rows),
                        compress(tx_packets, rows),
                    ),
                )
            )
            steady_keys = tuple(compress(keys, columns))
            kept = (
                list(compress(rx_bytes, columns)),
                list(compress(tx_bytes, columns)),
                list(compress(rx_packets, columns)),
                list(compress(tx_packets, columns)),
            )
        # The old steady counters that do not go on as columns (their tap went by rows, or is
        # gone without a final sample yet) stay tracked in the per-key dict; the dict's
        # counters that go on as columns leave it.
        # (every steady counter not lifted leads and goes on: none left over)
        if not (every and lead):
            every_pos = [*old.lead_positions(), *pos]
            left = old.left_over(every_pos if every else list(compress(every_pos, columns)))
            if left:
                counters.update(zip(map(old.keys.__getitem__, left), map(old.row, left)))
        for i in from_dict:
            if columns[lead + i]:
                del counters[after[i]]
        created = self._created
        if created:  # (the leading keys are steady counters: none was born)
            born = map(eq, pos, repeat(old.born))
            newborn = list(compress(after, born if every else map(mul, columns[lead:], born)))
            if created.keys() == set(newborn):
                created.clear()  # a storm's: every link created since was born by columns
            else:
                for key in newborn:
                    created.pop(key, None)
        end = now_ms if now_ms > start else start + 1
        if every and lead:
            ifindexes = (*old.stayed("ifindexes"), *map(_IFINDEX, steady_keys[lead:]))
            names = (*old.stayed("names"), *map(_NAME, steady_keys[lead:]))
        else:
            ifindexes, names = tuple(map(_IFINDEX, steady_keys)), tuple(map(_NAME, steady_keys))
        self._set_steady(
            SteadyColumns(
                steady_keys,
                ifindexes,
                names,
                *kept,
                end,
                mono_ms,
            )
        )
        # The rows after: every counter they may look up (a name's older incarnation) is
        # tracked in the per-key dict or in the new columns under another name.
        deltas = self._poll_rows(now_ms, mono_ms, by_rows, present)
        moved = [rxb, txb, rxp, txp]
        if not every:
            moved = [list(map(mul, column, columns)) for column in moved]
        zeroed = ColumnDeltas(tuple(keys), start, end, *moved)
        return zeroed, deltas

    def _born_since(
        self,
        now_ms: int,
        after: Sequence[CounterKey],
        old: LastReadings,
        missing: list[int],
        pos: list[int],
    ) -> list[int]:
        """poll_mixed's untracked counters (the keys `after` the lead at `missing`, where `pos`
        is still old.unknown) that poll_readings would count from zero since the last poll
        (born while running: a storm's new taps) over the very interval of the steady ones
        (old.start): so they go by columns too, from a zero row, when they grew within the
        ceiling. Returns their positions in `after`."""
        last = self._last_poll
        if last is None or min(last[0], now_ms) != old.start or last[1] != old.mono_ms:
            return []  # not the steady counters' interval (a clock step): by rows
        boot_id, closed, preexisting, created = self.boot_id, self._closed, self._preexisting, self._created
        if self._held:  # not read this poll, as closed ones
            closed = closed | self._held
        at = list(compress(missing, map(eq, map(pos.__getitem__, missing), repeat(old.unknown))))
        candidates = list(map(after.__getitem__, at))
        names = list(map(_NAME, candidates))
        # A storm's new taps, as a rule: none closed, tracked under its name (this key, read at
        # another instant, or an older incarnation still open: by rows), baselined, all of
        # this boot. A set operation per rule, no step per candidate; the tracked names are
        # looked up among the candidates' few (no set of every steady counter's name made).
        wanted = set(names)
        if (
            wanted.isdisjoint(old.tracked_names())
            and wanted.isdisjoint(map(_NAME, self._counters))
            and closed.isdisjoint(candidates)
            and preexisting.isdisjoint(candidates)
            and set(map(_BOOT_ID, candidates)) <= {boot_id}
        ):
            return at
        # C-level passes over the candidates, one per rule
        tracked_names = set(old.tracked_names())
        tracked_names.update(map(_NAME, self._counters))
        rules = [
            map(eq, map(_BOOT_ID, candidates), repeat(boot_id)),
            map(not_, map(closed.__contains__, candidates)),
            map(not_, map(tracked_names.__contains__, names)),
        ]
        if preexisting:  # baselined, not counted
            rules.append(
                map(
                    or_,
                    map(not_, map(preexisting.__contains__, candidates)),
                    map(created.__contains__, candidates),
                )
            )
        return list(compress(at, map(all, zip(*rules))))

    def _set_steady(self, steady: SteadyColumns | None) -> None:
        self._steady = steady
        self._lifted = set()
        self._steady_index = None

    def _index(self) -> dict[CounterKey, int]:
        """The steady counters' key -> position (lifted keys included), built when first asked."""
        assert self._steady is not None
        if self._steady_index is None:
            self._steady_index = dict(zip(self._steady.keys, range(len(self._steady.keys))))
        return self._steady_index

    def _lift(self, key: CounterKey) -> None:
        """Take one counter out of the steady columns into the per-key dict (a final sample is
        about to close it): the others stay columns, no Python step each (a VM storm closes a
        tenth of a host's counters between two polls)."""
        if self._steady is None or key in self._lifted:
            return
        pos = self._index().get(key)
        if pos is None:
            return
        self._counters[key] = self._steady.row(pos)
        self._lifted.add(key)

    def _settle(self) -> None:
        """Put the steady counters back into the per-key dict (rows are about to be read)."""
        if self._steady is not None:
            steady = self._steady
            counters = self._counters
            lifted = {key: counters.get(key) for key in self._lifted}  # their rows are newer
            rows = zip(*steady[1:7], repeat(steady.end_ms), repeat(steady.mono_ms))
            counters.update(zip(steady.keys, map(counter_row, rows)))
            for key, row in lifted.items():
                if row is None:
                    del counters[key]
                else:
                    counters[key] = row
            self._set_steady(None)
