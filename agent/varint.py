"""Protobuf's base-128 varint, for the bytes the agent writes around protobuf's own (batch
framing, the steady path's counts, a reborn tap's ifindex): the same bytes protobuf writes
for a non-negative integer, without a message made for it."""

from __future__ import annotations


def varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


_ONE_BYTE = tuple(bytes((i,)) for i in range(0x80))


def varint(value: int) -> bytes:
    # Most are lengths and ifindexes: one to three bytes, without a loop (a host that has made
    # taps for a while has ifindexes past 16,383)
    if value < 0x80:
        return _ONE_BYTE[value]
    if value < 0x4000:
        return bytes((value & 0x7F | 0x80, value >> 7))
    if value < 0x200000:
        return bytes((value & 0x7F | 0x80, value >> 7 & 0x7F | 0x80, value >> 14))
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
