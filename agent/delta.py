"""The delta engine: kernel counter readings in, billable deltas out.

Pure: no I/O, no clock reads. The caller passes the wall-clock time (ms since the epoch, used for
the measure intervals) and a monotonic time (ms, CLOCK_MONOTONIC: comparable across agent restarts
within one boot, used for rate plausibility) with every call.

Rules (each has a table test in tests/unit/test_delta.py):
- Identity is CounterKey(boot_id, ifindex, name); `vnetN` names are reused, so the name alone is not.
- A key first seen by the engine counts from zero when its creation happened while the engine was
  accounting (a link "new" event, or absent from every host-link set since the engine started or
  from the saved state); a key that already existed at a fresh start without saved state is only
  baselined, so bytes moved before kvmeter ran are never billed.
- A decrease is a 32-bit wrap only when the previous value was near 2^32 (its top quarter) and
  the wrapped amount fits the line-rate ceiling over the elapsed time; otherwise the counter was
  reset and the new value counts from zero.
- A delta above the line-rate ceiling over the elapsed time is quarantined with a reason: counted,
  never billed.
- Intervals per counter are contiguous and never inverted, even when the wall clock steps back.
- A final sample (RTM_DELLINK's stats) closes its counter; later samples of that key are ignored
  and the same name with a new ifindex is a new counter.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence, Set
from dataclasses import dataclass
from functools import partial
from itertools import compress, repeat
from operator import attrgetter, eq, ge, le, lt, mul, ne, not_, sub
from typing import Any, NamedTuple

from kvmeter.agent.model import ColumnDeltas, CounterKey, CounterSample, Delta

WRAP32 = 1 << 32
# A decrease can be a 32-bit wrap only from the top quarter of the range: at a fast line rate
# the ceiling alone would let any decrease pass for a wrap and bill gigabytes for a reset.
WRAP_NEAR = WRAP32 - WRAP32 // 4
STATE_VERSION = 1
# A tracked key missing from this many consecutive polls without a final sample is forgotten
# (its DELLINK was missed); until then a late final event still finds its last values.
ABSENT_POLLS_BEFORE_FORGET = 3
# The smallest Ethernet frame on the wire bounds packets per byte of line rate.
MIN_FRAME_BYTES = 60
# (rx_bytes, rx_packets, tx_bytes, tx_packets): one interface's reading, in /proc/net/dev's order
Stats = tuple[int, int, int, int]


@dataclass(frozen=True)
class DeltaConfig:
    line_rate_ceiling_bps: int = 100_000_000_000  # bits/s: above this a jump is quarantined
    # Elapsed time below this is treated as this (a poll right after another still allows bursts).
    min_elapsed_ms: int = 1000


class _Counter(NamedTuple):
    """One counter's last reading, laid out as a row of the saved state (see to_state): a tuple
    is replaced on every reading, so a snapshot of the rows can never change under its holder."""

    ifindex: int
    name: str
    rx_bytes: int
    tx_bytes: int
    rx_packets: int
    tx_packets: int
    end_ms: int  # wall-clock end of the last interval: the next one starts here
    mono_ms: int  # monotonic time of the last reading


_NAME = attrgetter("name")
_IFINDEX = attrgetter("ifindex")
_BOOT_ID = attrgetter("boot_id")
# Builds a tuple subclass from a ready tuple without the generated __new__ (a Python call): the
# hot loop makes one Delta per moving interface per poll.
_new = tuple.__new__
# The same, as a one-argument C callable for map(): a _Counter from a ready row tuple.
_counter_row = partial(tuple.__new__, _Counter)


class _Steady(NamedTuple):
    """The counters of the last steady poll (see poll_columns), kept as its columns: all read
    at one instant, so one end and one monotonic time. While it exists its keys are not in the
    per-key dict; a poll by rows or a final sample puts them back first (_settle). Saved as
    its fields after `keys`."""

    keys: tuple[CounterKey, ...]
    ifindexes: tuple[int, ...]
    names: tuple[str, ...]
    rx_bytes: list[int]
    tx_bytes: list[int]
    rx_packets: list[int]
    tx_packets: list[int]
    end_ms: int
    mono_ms: int


def _values(sample: CounterSample) -> tuple[int, int, int, int]:
    return (sample.rx_bytes, sample.tx_bytes, sample.rx_packets, sample.tx_packets)


class _OldColumns:
    """What poll_mixed compares a poll's readings with, by position: the last steady poll's
    counters (copies of its columns; lifted ones left out of the index), two zero rows (for
    `unknown` counters and for those `born` since the last poll), then the rows poll_mixed
    takes from the per-key dict (`take`)."""

    def __init__(self, steady: _Steady | None, index: dict[CounterKey, int], lifted: set[CounterKey]) -> None:
        self.steady = steady
        n = len(steady.keys) if steady is not None else 0
        self.unknown, self.born = n, n + 1
        self.lifted_at = [index[key] for key in lifted]
        if self.lifted_at:
            index = dict(index)
            for key in lifted:
                del index[key]
        self.index = index
        self.keys: tuple[CounterKey, ...] = steady.keys if steady is not None else ()
        self.start: int | None = steady.end_ms if steady is not None else None
        self.mono_ms: int | None = steady.mono_ms if steady is not None else None
        zeros = [0, 0]
        self.rx_bytes = list(steady.rx_bytes) + zeros if steady is not None else zeros
        self.tx_bytes = list(steady.tx_bytes) + zeros if steady is not None else list(zeros)
        self.rx_packets = list(steady.rx_packets) + zeros if steady is not None else list(zeros)
        self.tx_packets = list(steady.tx_packets) + zeros if steady is not None else list(zeros)

    @classmethod
    def of(cls, steady: _Steady | None, index: dict[CounterKey, int], lifted: set[CounterKey]) -> _OldColumns:
        return cls(steady, index, lifted)

    def take(self, row: _Counter) -> bool:
        """Add a per-key row read at the columns' instant (the first one sets it when there
        are no columns); False, adding nothing, for a row read at another instant."""
        if self.start is None:
            self.start, self.mono_ms = row.end_ms, row.mono_ms
        elif row.end_ms != self.start or row.mono_ms != self.mono_ms:
            return False
        self.rx_bytes.append(row.rx_bytes)
        self.tx_bytes.append(row.tx_bytes)
        self.rx_packets.append(row.rx_packets)
        self.tx_packets.append(row.tx_packets)
        return True

    def _mask(self) -> list[int]:
        mask = [1] * self.unknown
        for p in self.lifted_at:
            mask[p] = 0
        return mask

    def tracked_names(self) -> Iterable[str]:
        """The names of the steady counters still tracked as such (lifted ones left out)."""
        if self.steady is None:
            return ()
        return compress(self.steady.names, self._mask()) if self.lifted_at else self.steady.names

    def left_over(self, kept: list[int]) -> list[int]:
        """Positions of the steady counters neither lifted nor among `kept` (positions that go
        on as columns)."""
        n = self.unknown
        if sum(map(lt, kept, repeat(n))) + len(self.lifted_at) == n:
            return []  # every one goes on or was lifted (a storm): no Python step each
        gone = set(kept)
        gone.update(self.lifted_at)
        return [p for p in range(n) if p not in gone]

    def row(self, p: int) -> _Counter:
        s = self.steady
        assert s is not None
        return _new(
            _Counter,
            (
                s.ifindexes[p],
                s.names[p],
                s.rx_bytes[p],
                s.tx_bytes[p],
                s.rx_packets[p],
                s.tx_packets[p],
                s.end_ms,
                s.mono_ms,
            ),
        )


class DeltaEngine:
    """Per-counter state and the rules above. One engine per host boot."""

    def __init__(self, boot_id: str, config: DeltaConfig | None = None) -> None:
        self.boot_id = boot_id
        self.config = config or DeltaConfig()
        self._counters: dict[CounterKey, _Counter] = {}
        self._steady: _Steady | None = None  # more tracked counters, as columns
        # Keys of _steady that a final sample took out of it (their rows are in the per-key
        # dict, or closed): the other steady counters stay as columns (see _lift)
        self._lifted: set[CounterKey] = set()
        self._steady_index: dict[CounterKey, int] | None = None  # _steady's key -> position
        # Tracked keys missing from the last polls (neither read nor present) -> polls missed.
        self._absent: dict[CounterKey, int] = {}
        # Keys that existed before the engine could account for them: baselined, never counted.
        self._preexisting: set[CounterKey] = set()
        # "new" link events seen while running -> polls since (the event may precede the read)
        self._created: dict[CounterKey, int] = {}
        self._closed: set[CounterKey] = set()  # keys finished by a final sample
        self._last_poll: tuple[int, int] | None = None  # (wall ms, mono ms) of the last poll
        self._fresh = True  # no poll yet and no saved state
        # The last `present` frozenset and its key set: a caller that passes the same frozenset
        # from poll to poll spares rebuilding the set of every host link's key.
        self._present_arg: object = None
        self._present_keys: Set[CounterKey] = frozenset()

    # -- inputs -------------------------------------------------------------------------------

    def link_created(self, key: CounterKey) -> None:
        """A link "new" event: this identity was born while we were accounting."""
        if key.boot_id == self.boot_id and not self._tracks(key):
            self._created[key] = 0
            self._preexisting.discard(key)

    def poll(
        self,
        now_ms: int,
        mono_ms: int,
        samples: Iterable[CounterSample],
        present: Iterable[CounterKey] | None = None,
    ) -> list[Delta]:
        """One poll: `samples` are the metered interfaces' readings, `present` every host link's key
        (defaults to the samples' keys). Returns one Delta per sample that moved or was reset."""
        readings = [(s.key, (s.rx_bytes, s.rx_packets, s.tx_bytes, s.tx_packets)) for s in samples]
        return self.poll_readings(now_ms, mono_ms, readings, present)

    def poll_readings(
        self,
        now_ms: int,
        mono_ms: int,
        readings: Iterable[tuple[CounterKey, Stats]],
        present: Iterable[CounterKey] | None = None,
    ) -> list[Delta]:
        """`poll` for (key, (rx_bytes, rx_packets, tx_bytes, tx_packets)) pairs, the order of
        /proc/net/dev: no sample object per interface on the hot path. `present` may be a
        frozenset the caller passes again while the host's links are unchanged."""
        self._settle()
        return self._poll_rows(now_ms, mono_ms, readings, present)

    def _poll_rows(
        self,
        now_ms: int,
        mono_ms: int,
        readings: Iterable[tuple[CounterKey, Stats]],
        present: Iterable[CounterKey] | None,
    ) -> list[Delta]:
        """poll_readings over the per-key dict (steady columns, if any, left as they are)."""
        boot_id = self.boot_id
        if not isinstance(readings, list):
            readings = list(readings)  # read twice: here and when ageing absent keys
        present_keys = self._present_set(present, [key for key, _ in readings])
        if self._fresh:
            read_keys = {key for key, _ in readings if key.boot_id == boot_id}
            self._preexisting = (set(present_keys) | read_keys) - set(self._created)
            self._fresh = False
        deltas: list[Delta] = []
        append = deltas.append
        counters = self._counters
        min_elapsed = self.config.min_elapsed_ms
        ceiling = self.config.line_rate_ceiling_bps
        tracked_names: dict[str, CounterKey] | None = None
        for key, stats in readings:
            prev = counters.get(key)
            if prev is not None:
                # Fast path (nearly every counter, every poll): all four grew within the ceiling.
                rx_bytes, rx_packets, tx_bytes, tx_packets = stats
                ifindex, name, old_rxb, old_txb, old_rxp, old_txp, start, old_mono = prev
                rxb = rx_bytes - old_rxb
                txb = tx_bytes - old_txb
                rxp = rx_packets - old_rxp
                txp = tx_packets - old_txp
                elapsed = mono_ms - old_mono
                max_bytes = ceiling * (elapsed if elapsed > min_elapsed else min_elapsed) // 8000
                if rxb >= 0 and txb >= 0 and rxp >= 0 and txp >= 0 and rxb <= max_bytes and txb <= max_bytes:
                    end = now_ms if now_ms > start else start + 1
                    counters[key] = _new(
                        _Counter, (ifindex, name, rx_bytes, tx_bytes, rx_packets, tx_packets, end, mono_ms)
                    )
                    if rxb or txb or rxp or txp:
                        append(_new(Delta, (key, start, end, rxb, txb, rxp, txp, False, False, None)))
                    continue
            elif key.boot_id != boot_id:
                continue  # another boot's counter: not ours to account
            elif self._closed and key in self._closed:
                continue  # a reading older than the final sample that closed it
            else:
                if tracked_names is None:
                    tracked_names = {k.name: k for k in counters}
                older = tracked_names.get(key.name)
                if older is not None and older != key:
                    # The name's previous incarnation is still open: its final sample (or its
                    # forgetting) comes first, then this one counts from zero.
                    continue
            sample = CounterSample(key, stats[0], stats[2], stats[1], stats[3])
            delta = self._advance(sample, now_ms, mono_ms, final=False)
            if delta is not None:
                append(delta)
        self._age_absent(present_keys, [key for key, _ in readings])
        self._last_poll = (now_ms, mono_ms)
        return deltas

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

        The counters of a steady poll stay as columns until the next poll by rows (_Steady): a
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
            _Steady(keys, ifindexes, names, rx_bytes, tx_bytes, rx_packets, tx_packets, end, mono_ms)
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
        columns too (see _born_since); the same deltas and state, no Python step each."""
        if self._fresh or not keys:
            return None
        old = _OldColumns.of(self._steady, self._index() if self._steady is not None else {}, self._lifted)
        pos = list(map(old.index.get, keys, repeat(old.unknown)))
        missing = list(compress(range(len(keys)), map(eq, pos, repeat(old.unknown))))
        counters = self._counters
        from_dict = []  # positions in `keys` of counters read from the per-key dict
        for i in missing:
            row = counters.get(keys[i])
            if row is not None and old.take(row):
                pos[i] = len(old.rx_bytes) - 1
                from_dict.append(i)
        if old.start is None:
            return None  # nothing tracked
        start, last_mono = old.start, old.mono_ms
        if newborn_columns and len(from_dict) < len(missing):
            for i in self._born_since(now_ms, keys, old, missing, pos):
                pos[i] = old.born
        known = list(map(ne, pos, repeat(old.unknown)))
        rxb = list(map(sub, rx_bytes, map(old.rx_bytes.__getitem__, pos)))
        txb = list(map(sub, tx_bytes, map(old.tx_bytes.__getitem__, pos)))
        rxp = list(map(sub, rx_packets, map(old.rx_packets.__getitem__, pos)))
        txp = list(map(sub, tx_packets, map(old.tx_packets.__getitem__, pos)))
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
        # The old steady counters that do not go on as columns (their tap went by rows, or is
        # gone without a final sample yet) stay tracked in the per-key dict; the dict's
        # counters that go on as columns leave it.
        left = old.left_over(list(compress(pos, columns)))
        if left:
            counters.update(zip(map(old.keys.__getitem__, left), map(old.row, left)))
        for i in from_dict:
            if columns[i]:
                del counters[keys[i]]
        created = self._created
        if created:
            for key in compress(keys, map(mul, columns, map(eq, pos, repeat(old.born)))):
                created.pop(key, None)
        end = now_ms if now_ms > start else start + 1
        self._set_steady(
            _Steady(
                steady_keys,
                tuple(map(_IFINDEX, steady_keys)),
                tuple(map(_NAME, steady_keys)),
                list(compress(rx_bytes, columns)),
                list(compress(tx_bytes, columns)),
                list(compress(rx_packets, columns)),
                list(compress(tx_packets, columns)),
                end,
                mono_ms,
            )
        )
        # The rows after: every counter they may look up (a name's older incarnation) is
        # tracked in the per-key dict or in the new columns under another name.
        deltas = self._poll_rows(now_ms, mono_ms, by_rows, present)
        zeroed = ColumnDeltas(
            tuple(keys),
            start,
            end,
            list(map(mul, rxb, columns)),
            list(map(mul, txb, columns)),
            list(map(mul, rxp, columns)),
            list(map(mul, txp, columns)),
        )
        return zeroed, deltas

    def _born_since(
        self,
        now_ms: int,
        keys: Sequence[CounterKey],
        old: _OldColumns,
        missing: list[int],
        pos: list[int],
    ) -> list[int]:
        """poll_mixed's untracked counters (at `missing`, where `pos` is still old.unknown)
        that poll_readings would count from zero since the last poll (born while running: a
        storm's new taps) over the very interval of the steady ones (old.start): so they go by
        columns too, from a zero row, when they grew within the ceiling. Returns their positions."""
        last = self._last_poll
        if last is None or min(last[0], now_ms) != old.start or last[1] != old.mono_ms:
            return []  # not the steady counters' interval (a clock step): by rows
        boot_id, closed, preexisting, created = self.boot_id, self._closed, self._preexisting, self._created
        tracked_names = set(map(_NAME, self._counters))
        tracked_names.update(old.tracked_names())
        counters = self._counters
        born = []
        for i in missing:
            key = keys[i]
            if (
                pos[i] != old.unknown
                or key in counters  # tracked, read at another instant: by rows
                or key.boot_id != boot_id
                or key in closed
                or (key in preexisting and key not in created)  # baselined, not counted
                or key.name in tracked_names  # its name's older incarnation is still open
            ):
                continue
            born.append(i)
        return born

    def final(self, now_ms: int, mono_ms: int, sample: CounterSample) -> Delta | None:
        """RTM_DELLINK's final counters: the tail since the last poll, then the counter is closed."""
        if sample.key.boot_id != self.boot_id or sample.key in self._closed:
            return None
        self._lift(sample.key)
        untracked = sample.key not in self._counters and sample.key not in self._created
        if untracked and (self._fresh or sample.key in self._preexisting):
            # Existed before we ran and was never metered: nothing of it is ours to bill.
            self._preexisting.discard(sample.key)
            return None
        delta = self._grown(sample, now_ms, mono_ms) or self._advance(sample, now_ms, mono_ms, final=True)
        self._counters.pop(sample.key, None)
        self._created.pop(sample.key, None)
        self._closed.add(sample.key)
        return delta

    # -- rules --------------------------------------------------------------------------------

    def _grown(self, sample: CounterSample, now_ms: int, mono_ms: int) -> Delta | None:
        """A final sample's delta when all four counters grew within the ceiling (nearly every
        one: poll_readings' fast path), else None for _advance's rules."""
        prev = self._counters.get(sample.key)
        if prev is None:
            return None
        _i, _n, old_rxb, old_txb, old_rxp, old_txp, start, old_mono = prev
        rxb = sample.rx_bytes - old_rxb
        txb = sample.tx_bytes - old_txb
        rxp = sample.rx_packets - old_rxp
        txp = sample.tx_packets - old_txp
        limit = (
            self.config.line_rate_ceiling_bps * max(mono_ms - old_mono, self.config.min_elapsed_ms) // 8000
        )
        if min(rxb, txb, rxp, txp) < 0 or max(rxb, txb) > limit:
            return None
        end = now_ms if now_ms > start else start + 1
        return _new(Delta, (sample.key, start, end, rxb, txb, rxp, txp, False, True, None))

    def _advance(self, sample: CounterSample, now_ms: int, mono_ms: int, *, final: bool) -> Delta | None:
        key = sample.key
        cur = _values(sample)
        prev = self._counters.get(key)
        if prev is None:
            if key in self._preexisting and key not in self._created:
                self._preexisting.discard(key)
                self._counters[key] = _Counter(key.ifindex, key.name, *cur, now_ms, mono_ms)
                return None  # baseline: existed before kvmeter could account for it
            # Born while running: it counts from zero since (at the latest) the previous poll.
            start_ms, start_mono = self._last_poll if self._last_poll else (now_ms, mono_ms)
            start_ms = min(start_ms, now_ms)
            prev = _Counter(key.ifindex, key.name, 0, 0, 0, 0, start_ms, start_mono)
            self._created.pop(key, None)
        elapsed_ms = max(mono_ms - prev.mono_ms, self.config.min_elapsed_ms)
        max_bytes = self.config.line_rate_ceiling_bps * elapsed_ms // 8000
        max_packets = max_bytes // MIN_FRAME_BYTES
        limits = (max_bytes, max_bytes, max_packets, max_packets)
        old = (prev.rx_bytes, prev.tx_bytes, prev.rx_packets, prev.tx_packets)
        moved, wrapped, reset = _differences(old, cur, limits, final=final)
        start_ms = prev.end_ms
        end_ms = max(now_ms, start_ms + 1)  # contiguous, never inverted: the clock may step back
        self._counters[key] = _Counter(key.ifindex, key.name, *cur, end_ms, mono_ms)
        reason = None
        over = [n for n, m, lim in zip(("rx", "tx"), moved[:2], limits[:2]) if m > lim]
        if over:
            reason = (
                f"{'/'.join(over)} jump of {max(moved[:2])} bytes in {elapsed_ms} ms exceeds the "
                f"line-rate ceiling of {self.config.line_rate_ceiling_bps} bit/s"
            )
            if reset:
                reason += " (after a counter reset)"
        if not any(moved) and not final:
            return None
        return Delta(
            key=key,
            start_ms=start_ms,
            end_ms=end_ms,
            rx_bytes=moved[0],
            tx_bytes=moved[1],
            rx_packets=moved[2],
            tx_packets=moved[3],
            wrapped=wrapped,
            final_at_delete=final,
            quarantine_reason=reason,
        )

    def _present_set(
        self, present: Iterable[CounterKey] | None, read: Iterable[CounterKey]
    ) -> Set[CounterKey]:
        """This boot's keys of every host link (`present`; when None, the keys read)."""
        boot_id = self.boot_id
        if present is None:
            return {key for key in read if key.boot_id == boot_id}
        if present is self._present_arg:
            return self._present_keys
        if isinstance(present, frozenset) and set(map(_BOOT_ID, present)) <= {boot_id}:
            present_keys = present  # all of this boot (as always): one C-level pass, no copy
        else:
            present_keys = frozenset(k for k in present if k.boot_id == boot_id)
        if isinstance(present, frozenset):  # immutable: safe to recognise by identity
            self._present_arg, self._present_keys = present, present_keys
        return present_keys

    def _age_absent(self, present: Set[CounterKey], read: Iterable[CounterKey]) -> None:
        """Count the polls each tracked key has been missing (neither read nor a present link);
        forget it after ABSENT_POLLS_BEFORE_FORGET. Usually every tracked key is present: one
        set difference, nothing per key."""
        missing = self._counters.keys() - present
        if missing:
            missing -= set(read)
        for key in [k for k in self._absent if k not in missing]:
            del self._absent[key]
        for key in missing:
            polls = self._absent[key] = self._absent.get(key, 0) + 1
            if polls >= ABSENT_POLLS_BEFORE_FORGET:
                del self._counters[key]
                del self._absent[key]
        # Closed, created and pre-existing keys only matter while the link exists.
        if self._closed:
            self._closed &= present
        if self._preexisting:
            self._preexisting &= present
        for key in list(self._created):
            self._created[key] = 0 if key in present else self._created[key] + 1
            if self._created[key] >= ABSENT_POLLS_BEFORE_FORGET:
                del self._created[key]

    # -- state --------------------------------------------------------------------------------

    def _set_steady(self, steady: _Steady | None) -> None:
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
        s = self._steady
        self._counters[key] = _new(
            _Counter,
            (
                s.ifindexes[pos],
                s.names[pos],
                s.rx_bytes[pos],
                s.tx_bytes[pos],
                s.rx_packets[pos],
                s.tx_packets[pos],
                s.end_ms,
                s.mono_ms,
            ),
        )
        self._lifted.add(key)

    def _settle(self) -> None:
        """Put the steady counters back into the per-key dict (rows are about to be read)."""
        if self._steady is not None:
            steady = self._steady
            counters = self._counters
            lifted = {key: counters.get(key) for key in self._lifted}  # their rows are newer
            rows = zip(*steady[1:7], repeat(steady.end_ms), repeat(steady.mono_ms))
            counters.update(zip(steady.keys, map(_counter_row, rows)))
            for key, row in lifted.items():
                if row is None:
                    del counters[key]
                else:
                    counters[key] = row
            self._set_steady(None)

    def _tracks(self, key: CounterKey) -> bool:
        if key in self._counters:
            return True
        return self._steady is not None and key not in self._lifted and key in self._index()

    def tracked_count(self) -> int:
        steady = len(self._steady.keys) - len(self._lifted) if self._steady is not None else 0
        return len(self._counters) + steady

    def tracked_keys(self) -> Set[CounterKey]:
        if self._steady is None:
            return self._counters.keys()
        return self._counters.keys() | (set(self._steady.keys) - self._lifted)

    def tracked(self) -> dict[CounterKey, tuple[int, int, int, int]]:
        """Last values per tracked counter (rx_bytes, tx_bytes, rx_packets, tx_packets)."""
        self._settle()
        return {k: (c.rx_bytes, c.tx_bytes, c.rx_packets, c.tx_packets) for k, c in self._counters.items()}

    def to_state(self) -> dict[str, Any]:
        """A msgpack-friendly snapshot, saved with every spooled batch."""
        if self._lifted:
            self._settle()  # the columns still hold the lifted counters' old rows
        return {
            "v": STATE_VERSION,
            "boot_id": self.boot_id,
            # rows [ifindex, name, rx_bytes, tx_bytes, rx_packets, tx_packets, end_ms, mono_ms]:
            # the counters are kept as such (immutable) rows, so this is a shallow copy
            "counters": list(self._counters.values()),
            # the steady poll's counters as its columns [ifindexes, names, rx_bytes, tx_bytes,
            # rx_packets, tx_packets, end_ms, mono_ms]: never changed in place, so no copy
            "steady": self._steady[1:] if self._steady is not None else None,
            "preexisting": [[k.ifindex, k.name] for k in self._preexisting],
            "closed": [[k.ifindex, k.name] for k in self._closed],
            "last_poll": list(self._last_poll) if self._last_poll else None,
            "fresh": self._fresh,
        }

    @classmethod
    def from_state(
        cls, boot_id: str, state: dict[str, Any] | None, config: DeltaConfig | None = None
    ) -> DeltaEngine:
        """Resume from a snapshot. A snapshot of another boot is worthless (ifindexes restart), so
        the engine starts fresh and baselines."""
        engine = cls(boot_id, config)
        if not state or state.get("v") != STATE_VERSION or state.get("boot_id") != boot_id:
            return engine
        rows = list(state["counters"])
        steady = state.get("steady")  # absent from the snapshots of earlier versions
        if steady:
            *columns, end_ms, mono_ms = steady
            rows += zip(*columns, repeat(end_ms), repeat(mono_ms))
        for ifindex, name, rxb, txb, rxp, txp, end_ms, mono_ms in rows:
            engine._counters[CounterKey(boot_id, ifindex, name)] = _Counter(
                ifindex, name, rxb, txb, rxp, txp, end_ms, mono_ms
            )
        engine._preexisting = {CounterKey(boot_id, i, n) for i, n in state["preexisting"]}
        engine._closed = {CounterKey(boot_id, i, n) for i, n in state["closed"]}
        last = state.get("last_poll")
        engine._last_poll = (int(last[0]), int(last[1])) if last else None
        engine._fresh = bool(state.get("fresh", False))
        return engine


def _differences(
    old: tuple[int, ...], cur: tuple[int, ...], limits: tuple[int, ...], *, final: bool = False
) -> tuple[tuple[int, int, int, int], bool, bool]:
    """(moved per counter, wrapped, reset). One implausible decrease means the interface's counters
    were reset (recreated, driver reload): then every counter counts from zero.

    A final sample is the same device as the last reading (same ifindex, taken as it was
    removed), so it cannot have been reset: a counter it reports lower (a veth's rx, which the
    kernel sums from the peer that is already detached at delete) is unknown and moves nothing."""
    moved: list[int] = []
    wrapped = False
    for o, c, limit in zip(old, cur, limits):
        if c >= o:
            moved.append(c - o)
        elif WRAP_NEAR <= o < WRAP32 and WRAP32 - o + c <= limit:
            moved.append(WRAP32 - o + c)
            wrapped = True
        elif final:
            moved.append(0)
        else:
            return (cur[0], cur[1], cur[2], cur[3]), False, True
    return (moved[0], moved[1], moved[2], moved[3]), wrapped, False
