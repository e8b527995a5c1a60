"""The delta engine's final samples taken together (`ColumnFinals`, a part of DeltaEngine): the
RTM_DELLINK counters of the links a VM storm deleted since the last poll, a tenth of a host's
taps. Those still in the last steady poll's columns that take final()'s fast path (every
counter grew within the ceiling, or one reported lower cannot have wrapped) are concluded by
C-level passes over the columns; the others go one by one through final().

An accelerator only: `finals` concludes what final() concludes for each sample in turn, and
leaves the same state (tests/unit/test_delta_finals.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import compress, repeat
from operator import gt, is_, itemgetter, lt, or_, sub
from typing import TYPE_CHECKING, cast

from kvmeter.agent.counter_rows import SteadyColumns
from kvmeter.agent.model import CounterKey, CounterSample, Delta, new_tuple
from kvmeter.agent.wrap_zone import may_have_wrapped

if TYPE_CHECKING:
    from kvmeter.agent.delta import DeltaConfig, Stats

# One final sample: (wall ms, mono ms, key, (rx_bytes, rx_packets, tx_bytes, tx_packets))
FinalReading = tuple[int, int, CounterKey, "Stats"]

_WALL, _MONO, _KEY, _STATS = (itemgetter(i) for i in range(4))
_TAIL = (False, True, None)  # a final's delta: not wrapped, final, not quarantined


class ColumnFinals:
    """DeltaEngine.finals (see the module's docstring)."""

    config: DeltaConfig
    _steady: SteadyColumns | None
    _lifted: set[CounterKey]
    _closed: set[CounterKey]
    _created: dict[CounterKey, int]

    # The engine's own (kvmeter.agent.delta.DeltaEngine, delta_columns.ColumnPolls)
    def final(self, now_ms: int, mono_ms: int, sample: CounterSample) -> Delta | None:
        raise NotImplementedError

    def _index(self) -> dict[CounterKey, int]:
        raise NotImplementedError

    def finals(self, finals: Sequence[FinalReading]) -> list[Delta]:
        """final() for each of `finals` in turn: the deltas it returns, in order, and the same
        state. Final samples of distinct keys commute, so those on the fast path are concluded
        together, the others one by one."""
        n = len(finals)
        keys = list(map(_KEY, finals))
        steady = self._steady
        if steady is None or len(set(keys)) != n:
            return self._one_by_one(finals)  # no columns, or a key twice (its second a no-op)
        lifted = self._lifted
        pos = list(map(self._index().get, keys))
        # in the columns and not lifted out of them (their keys are this boot's, tracked)
        fast = [p is not None and k not in lifted for p, k in zip(pos, keys)]
        if not any(fast):
            return self._one_by_one(finals)
        at = cast("list[int]", list(compress(pos, fast)))  # the fast ones' positions: none is None
        cur = zip(*map(_STATS, compress(finals, fast)))  # rx_bytes, rx_packets, tx_bytes, tx_packets
        old = [
            list(map(column.__getitem__, at))
            for column in (steady.rx_bytes, steady.rx_packets, steady.tx_bytes, steady.tx_packets)
        ]
        moved = [list(map(sub, c, o)) for c, o in zip(cur, old)]
        slow = [False] * len(at)
        for column, before in zip(moved, old):
            if min(column) < 0:  # read lower: moved nothing, unless it may have wrapped
                for i in compress(range(len(column)), map(lt, column, repeat(0))):
                    column[i] = 0
                    slow[i] = slow[i] or may_have_wrapped(before[i])  # the full rules decide
        rxb, rxp, txb, txp = moved
        ceiling, least, since = self.config.line_rate_ceiling_bps, self.config.min_elapsed_ms, steady.mono_ms
        limits = [ceiling * (m - since if m - since > least else least) // 8000 for m in map(_MONO, finals)]
        slow = list(map(or_, slow, map(gt, map(max, rxb, txb), compress(limits, fast))))
        start = steady.end_ms
        ends = [w if w > start else start + 1 for w in compress(map(_WALL, finals), fast)]
        if len(at) == n and not any(slow):  # a storm's: all by columns, no Python step each
            self._conclude(keys)
            tails = zip(keys, repeat(start), ends, rxb, txb, rxp, txp, *map(repeat, _TAIL))
            return list(map(new_tuple, repeat(Delta), tails))
        out: list[Delta | None] = [None] * n
        concluded = []
        deltas = zip(compress(keys, fast), repeat(start), ends, rxb, txb, rxp, txp)
        for i, fields, to_rules in zip(compress(range(n), fast), deltas, slow):
            if not to_rules:
                out[i] = new_tuple(Delta, fields + _TAIL)
                concluded.append(fields[0])
        self._conclude(concluded)
        for i in compress(range(n), map(is_, out, repeat(None))):
            out[i] = self._one(finals[i])
        return list(filter(None, out))

    def _conclude(self, concluded: list[CounterKey]) -> None:
        """The counters whose final samples `finals` concluded by columns: closed."""
        self._lifted.update(concluded)
        self._closed.update(concluded)
        if self._created:
            for key in concluded:
                self._created.pop(key, None)

    def _one_by_one(self, finals: Sequence[FinalReading]) -> list[Delta]:
        return list(filter(None, map(self._one, finals)))

    def _one(self, final: FinalReading) -> Delta | None:
        wall_ms, mono_ms, key, (rx_bytes, rx_packets, tx_bytes, tx_packets) = final
        return self.final(wall_ms, mono_ms, CounterSample(key, rx_bytes, tx_bytes, rx_packets, tx_packets))
