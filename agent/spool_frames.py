"""The spool's frame (kvmeter.agent.spool): u32 length and u32 CRC32 of the payload, then the
msgpack payload [stream_id, seq, batch bytes, counter state or nil, written at (ms)]. One frame
written as pieces, a segment's frames read back. Pure, no I/O."""

from __future__ import annotations

import struct
import zlib
from typing import Any, NamedTuple

import msgpack

HEADER = struct.Struct(">II")  # payload length, CRC32 of the payload
MAX_FRAME = 256 * 1024 * 1024  # anything larger is corruption, not a batch


class ReadFrame(NamedTuple):
    """A whole frame found in a segment's bytes."""

    offset: int
    size: int  # header + payload
    stream_id: str
    seq: int
    state: dict[str, Any] | None
    written_ms: int


def frame_pieces(
    stream_id: str, seq: int, batch: bytes, packed_state: bytes | None, now_ms: int
) -> list[Any]:
    """One frame, header included, as pieces (for os.writev): the batch and the state are not
    copied. `packed_state`: msgpack's bytes of the counter state, None for none."""
    size = len(batch)
    if size < 0x100:
        bin_head = b"\xc4" + size.to_bytes(1, "big")
    elif size < 0x10000:
        bin_head = b"\xc5" + size.to_bytes(2, "big")
    else:
        bin_head = b"\xc6" + size.to_bytes(4, "big")
    head = b"\x95" + msgpack.packb(stream_id) + msgpack.packb(seq) + bin_head
    if packed_state is not None:
        pieces = [head, batch, packed_state, msgpack.packb(now_ms)]
    else:
        pieces = [head, batch, b"\xc0" + msgpack.packb(now_ms)]  # no state: nil
    crc = 0
    for piece in pieces:
        crc = zlib.crc32(piece, crc)
    pieces[0] = HEADER.pack(sum(map(len, pieces)), crc & 0xFFFFFFFF) + head
    return pieces


def read_frames(data: bytes) -> tuple[list[ReadFrame], str | None, int]:
    """The whole frames a segment's bytes start with; then what cut the rest short (a torn
    header or frame, a CRC mismatch, an undecodable payload: an interrupted write), None when
    nothing did, and the offset where the frames end."""
    frames: list[ReadFrame] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < HEADER.size:
            return frames, "torn header", offset
        length, crc = HEADER.unpack_from(data, offset)
        end = offset + HEADER.size + length
        if length > MAX_FRAME or end > len(data):
            return frames, "torn frame", offset
        payload = data[offset + HEADER.size : end]
        if zlib.crc32(payload) & 0xFFFFFFFF != crc:
            return frames, "CRC mismatch", offset
        try:
            stream_id, seq, _batch, state, written_ms = msgpack.unpackb(payload, raw=False)
        except Exception as exc:
            return frames, f"undecodable frame ({exc})", offset
        frames.append(ReadFrame(offset, end - offset, stream_id, seq, state, written_ms))
        offset = end
    return frames, None, offset
