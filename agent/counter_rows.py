"""The delta engine's records: a counter's last reading (`CounterRow`, also a row of the saved
state) and the last steady poll's counters kept as columns (`SteadyColumns`). Pure data."""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

from kvmeter.agent.model import CounterKey


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
