"""The delta engine's state (`EngineState`, a part of DeltaEngine): which counters it tracks,
and the snapshot saved with every spooled batch and resumed from at a restart.
"""

from __future__ import annotations

from collections.abc import Iterable, Set
from itertools import repeat
from typing import TYPE_CHECKING, Any, TypeVar

from kvmeter.agent.counter_rows import CounterRow, SteadyColumns
from kvmeter.agent.model import CounterKey

if TYPE_CHECKING:
    from kvmeter.agent.delta import DeltaConfig

STATE_VERSION = 1
_Engine = TypeVar("_Engine", bound="EngineState")


class EngineState:
    """DeltaEngine's tracking queries and snapshot (see the module's docstring)."""

    boot_id: str
    _counters: dict[CounterKey, CounterRow]
    _steady: SteadyColumns | None
    _lifted: set[CounterKey]
    _preexisting: set[CounterKey]
    _closed: set[CounterKey]
    _last_poll: tuple[int, int] | None
    _fresh: bool

    def __init__(self, boot_id: str, config: DeltaConfig | None = None) -> None:
        raise NotImplementedError

    # The engine's own (kvmeter.agent.delta_columns.ColumnPolls)
    def _index(self) -> dict[CounterKey, int]:
        raise NotImplementedError

    def _settle(self) -> None:
        raise NotImplementedError

    def untracked(self, keys: Iterable[CounterKey]) -> set[CounterKey]:
        """Those of `keys` the engine does not track (in the per-key dict, or in the steady
        columns and not lifted out of them), by set operations."""
        out = set(keys) - self._counters.keys()
        if out and self._steady is not None:
            out -= set(filter(self._index().__contains__, out)) - self._lifted  # in the columns
        return out

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
        cls: type[_Engine], boot_id: str, state: dict[str, Any] | None, config: DeltaConfig | None = None
    ) -> _Engine:
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
            engine._counters[CounterKey(boot_id, ifindex, name)] = CounterRow(
                ifindex, name, rxb, txb, rxp, txp, end_ms, mono_ms
            )
        engine._preexisting = {CounterKey(boot_id, i, n) for i, n in state["preexisting"]}
        engine._closed = {CounterKey(boot_id, i, n) for i, n in state["closed"]}
        last = state.get("last_poll")
        engine._last_poll = (int(last[0]), int(last[1])) if last else None
        engine._fresh = bool(state.get("fresh", False))
        return engine
