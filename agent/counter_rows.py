"""The delta engine's records: a counter's last reading (`CounterRow`, also a row of the saved
state), the last steady poll's counters kept as columns (`SteadyColumns`), and what a mixed poll
compares its readings with (`LastReadings`). Pure data."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from itertools import chain, repeat
from operator import attrgetter, lt
from typing import Any, NamedTuple

from kvmeter.agent.model import CounterKey, new_tuple


class CounterRow(NamedTuple):
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


# A CounterRow from a ready row tuple, a one-argument C callable for map() (no generated
# __new__, a Python call, per row)
counter_row = partial(tuple.__new__, CounterRow)


class SteadyColumns(NamedTuple):
    """The counters of the last steady poll (see poll_columns), kept as its columns: all read
    at one instant, so one end and one monotonic time. While it exists its keys are not in the
    per-key dict, but for those a final sample lifted out (DeltaEngine._lift); a poll by rows
    puts them back first (_settle). Saved as its fields after `keys`."""

    keys: tuple[CounterKey, ...]
    ifindexes: tuple[int, ...]
    names: tuple[str, ...]
    rx_bytes: list[int]
    tx_bytes: list[int]
    rx_packets: list[int]
    tx_packets: list[int]
    end_ms: int
    mono_ms: int

    def row(self, p: int) -> CounterRow:
        """The counter at position `p` as a row of the per-key dict."""
        return new_tuple(
            CounterRow,
            (
                self.ifindexes[p],
                self.names[p],
                self.rx_bytes[p],
                self.tx_bytes[p],
                self.rx_packets[p],
                self.tx_packets[p],
                self.end_ms,
                self.mono_ms,
            ),
        )


class LastReadings:
    """What poll_mixed compares a poll's readings with, by position: the last steady poll's
    counters (copies of its columns; lifted ones left out of the index), two zero rows (for
    `unknown` counters and for those `born` since the last poll), then the rows poll_mixed
    takes from the per-key dict (`take`)."""

    def __init__(
        self, steady: SteadyColumns | None, index: dict[CounterKey, int], lifted: set[CounterKey]
    ) -> None:
        self.steady = steady
        n = len(steady.keys) if steady is not None else 0
        self.unknown, self.born = n, n + 1
        self.lifted_at = [index[key] for key in lifted]
        self.lead = 0  # how many keys lead that are the steady counters not lifted (positions)
        self._index = index
        self._lifted = lifted
        self._kept_runs: list[slice] | None = None
        self.keys: tuple[CounterKey, ...] = steady.keys if steady is not None else ()
        self.start: int | None = steady.end_ms if steady is not None else None
        self.mono_ms: int | None = steady.mono_ms if steady is not None else None
        zeros = [0, 0]
        self.rx_bytes = list(steady.rx_bytes) + zeros if steady is not None else zeros
        self.tx_bytes = list(steady.tx_bytes) + zeros if steady is not None else list(zeros)
        self.rx_packets = list(steady.rx_packets) + zeros if steady is not None else list(zeros)
        self.tx_packets = list(steady.tx_packets) + zeros if steady is not None else list(zeros)

    def positions(self, keys: Sequence[CounterKey]) -> list[int]:
        """The positions here of the keys after the `lead` (set here): `unknown` where a key is
        not a steady counter. The lead is how many keys lead that are, in order, every steady
        counter not lifted. A storm's poll, its rows in the order of their ifindexes
        (PollPlan.rows_of: the taps that stayed, then the new ones), has them all in front:
        nothing is looked up nor listed for those."""
        steady = self.steady
        if steady is not None:
            stayed = tuple(self.stayed("keys"))
            s = len(stayed)
            if tuple(keys[:s]) == stayed:
                self.lead = s
                return [self.unknown] * (len(keys) - s)
        index = self._index
        if self.lifted_at:
            index = dict(index)
            for key in self._lifted:
                del index[key]
        self.lead = 0
        return list(map(index.get, keys, repeat(self.unknown)))

    def lead_positions(self) -> list[int]:
        """The positions of the leading keys (see positions): none when no key leads."""
        if not self.lead:
            return []
        runs = self._runs()
        return list(chain.from_iterable(map(range, map(_START, runs), map(_STOP, runs))))

    def column(self, name: str, rest: list[int]) -> Iterator[int]:
        """The last readings of one column (rx_bytes, ...) of the leading keys, then those at
        positions `rest` (the keys after them: see positions). An iterator, for one C-level pass
        that takes them (no list of them made)."""
        values = getattr(self, name)
        if not self.lead:
            return map(values.__getitem__, rest)
        return chain(self.stayed(name), map(values.__getitem__, rest))

    def stayed(self, name: str) -> Iterable[Any]:
        """One field of SteadyColumns (rx_bytes, ifindexes, ...) for the steady counters not
        lifted, in order: a slice per run of them between lifted ones (a storm's lifted taps
        lie in a few runs, as they were made)."""
        assert self.steady is not None
        column = getattr(self.steady, name)
        runs = self._runs()
        if len(runs) == 1:
            return column[runs[0]]
        return chain.from_iterable(map(column.__getitem__, runs))

    def take(self, row: CounterRow) -> bool:
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

    def _runs(self) -> list[slice]:
        """The positions of the steady counters not lifted, as slices (made once)."""
        if self._kept_runs is None:
            runs, start = [], 0
            for p in sorted(self.lifted_at):
                if p > start:
                    runs.append(slice(start, p))
                start = p + 1
            if start < self.unknown or not runs:
                runs.append(slice(start, self.unknown))
            self._kept_runs = runs
        return self._kept_runs

    def tracked_names(self) -> Iterable[str]:
        """The names of the steady counters still tracked as such (lifted ones left out)."""
        if self.steady is None:
            return ()
        return self.stayed("names") if self.lifted_at else self.steady.names

    def left_over(self, kept: list[int]) -> list[int]:
        """Positions of the steady counters neither lifted nor among `kept` (positions that go
        on as columns)."""
        n = self.unknown
        if sum(map(lt, kept, repeat(n))) + len(self.lifted_at) == n:
            return []  # every one goes on or was lifted (a storm): no Python step each
        gone = set(kept)
        gone.update(self.lifted_at)
        return [p for p in range(n) if p not in gone]

    def row(self, p: int) -> CounterRow:
        assert self.steady is not None
        return self.steady.row(p)


_START = attrgetter("start")
_STOP = attrgetter("stop")
