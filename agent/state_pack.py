"""The spool's counter state as msgpack bytes, the same bytes as `msgpack.packb(state,
use_bin_type=True)`, with the big sequences it packed last time reused by identity. Pure, no I/O.

A steady poll saves the delta engine's columns with every batch; the columns of its counters'
ifindexes and names are the same tuples from poll to poll until a link comes or goes (the
engine never changes its columns in place: kvmeter.agent.delta_columns), and packing them again
was a third of msgpack's share of the poll. msgpack writes an array as its header followed by
its items and a map as its header followed by each key and value in order, so a state packed in
pieces is the bytes packed at once (tests/unit/test_state_pack.py).
"""

from __future__ import annotations

from typing import Any

import msgpack

# Sequences shorter than this are packed every time: reusing them would save less than the
# lookup costs.
REUSED_FROM = 256
_SEQUENCES = (list, tuple)


class StatePacker:
    """`pack(state)`; keeps the big sequences of its last state and their bytes."""

    def __init__(self) -> None:
        # id -> (the sequence, its bytes): the object is held, so its id is not reused
        self._last: dict[int, tuple[Any, bytes]] = {}

    def pack(self, state: Any) -> bytes:
        seen: dict[int, tuple[Any, bytes]] = {}
        pieces: list[bytes] = []
        self._pieces(state, pieces, seen)
        self._last = seen
        return b"".join(pieces)

    def _pieces(self, value: Any, pieces: list[bytes], seen: dict[int, tuple[Any, bytes]]) -> None:
        if type(value) is dict:
            pieces.append(_map_header(len(value)))
            for key, item in value.items():
                pieces.append(msgpack.packb(key, use_bin_type=True))
                self._pieces(item, pieces, seen)
        elif _big(value):
            last = self._last.get(id(value))
            if last is not None and last[0] is value:
                packed = last[1]
            else:
                packed = msgpack.packb(value, use_bin_type=True)
            seen[id(value)] = (value, packed)
            pieces.append(packed)
        elif type(value) in _SEQUENCES and any(map(_big, value)):  # (the engine's columns)
            pieces.append(_array_header(len(value)))
            for item in value:
                self._pieces(item, pieces, seen)
        else:
            pieces.append(msgpack.packb(value, use_bin_type=True))


def _big(value: Any) -> bool:
    return type(value) in _SEQUENCES and len(value) >= REUSED_FROM


def _map_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x80 | n])
    return (b"\xde" + n.to_bytes(2, "big")) if n < 0x10000 else (b"\xdf" + n.to_bytes(4, "big"))


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    return (b"\xdc" + n.to_bytes(2, "big")) if n < 0x10000 else (b"\xdd" + n.to_bytes(4, "big"))
