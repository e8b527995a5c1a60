"""A steady poll's measures written as protobuf wire bytes. Pure, no I/O.

A busy host's poll is thousands of IPMeasure records that differ from the last poll's only in
bytes, packets, start and end. Building a message object per measure costs more than reading the
kernel's table; here each record is its counter's serialised template (Templates, measures.py)
behind the moving fields, and every step runs over whole columns in C:

- protobuf writes all the counts at once as one packed field (`PackedCounts`): `<bytes> 0x38
  <packets>` per measure (field 3 and field 7 of IPMeasure, both varints; 0x38, the packets
  tag, is a varint of itself);
- a regular expression cuts that run into one piece per measure (a varint ends at the first
  byte below 0x80);
- each record is its head, `0x3a <length>` (MeasureBatch field 7) + times + `0x18` (the bytes
  tag), one per record length for the whole poll, then counts and template: three pieces,
  and the records are joined in one call (per part, when a poll is bigger than a Kafka record
  may be).

Protobuf parsers take a message's fields in any order and concatenated records of a repeated
field as one list, so the result decodes exactly like build_batch's output for the same deltas
(tests/unit/test_wire.py proves it field by field). A batch is its header message's bytes
followed by records.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from itertools import compress, islice, repeat
from operator import add, attrgetter, or_

from kvmeter.agent.measures import _Pair
from kvmeter.agent.model import ColumnDeltas
from kvmeter.agent.varint import varint, varint_size
from kvmeter.proto.encoding_pb2 import PackedCounts

_BYTES_TAG = 0x18  # IPMeasure.bytes = 3, varint
_PACKETS_TAG = 0x38  # IPMeasure.packets = 7, varint
_START_TAG = 0x20  # IPMeasure.start = 4
_END_TAG = 0x28  # IPMeasure.end = 5
_MEASURES_TAG = 0x3A  # MeasureBatch.measures = 7, length-delimited
_VARINT = rb"[\x80-\xff]*[\x00-\x7f]"
_COUNTS = re.compile(_VARINT + rb"\x38" + _VARINT)
_RX_WIRE = attrgetter("rx_wire")
_TX_WIRE = attrgetter("tx_wire")
_UNSWAPPED = attrgetter("unswapped")
_TRAFFIC_TYPE = attrgetter("traffic_type")


# bytes.join takes 80 bytes of bookkeeping per piece (3 per record): a part of up to 4,096
# records (2,000 interfaces' poll) is joined at once, a bigger one in runs of 1,024 records.
_PIECES = 3  # a record's: head, counts, template
_JOIN_PIECES = _PIECES * 1024
_ONE_JOIN_PIECES = 4 * _JOIN_PIECES
_MAX_COUNTS = 22  # 0x18 <bytes> 0x38 <packets>: two varints of up to 10 bytes


def packed_varints(values: Sequence[int]) -> bytes:
    """The values as consecutive varints (written by protobuf's C code)."""
    packed = PackedCounts()
    packed.values.extend(values)
    data = packed.SerializeToString()
    if not data:
        return b""
    length_end = 1  # skip the field's tag, then its length varint
    while data[length_end] & 0x80:
        length_end += 1
    return data[length_end + 1 :]


class _Heads:
    """`0x3a <length>`, the start of a measure record, by the record's length less one (its
    bytes tag, which the poll's heads end with): a list grown to the longest record seen. One
    table serves every encoder (an encoder is built again after every VM storm; the lengths'
    heads stay the same)."""

    def __init__(self) -> None:
        self._heads: list[bytes] = []

    def for_poll(self, longest: int, times: bytes) -> list[bytes]:
        """A poll's heads, `0x3a <length>` + times + `0x18`, of records up to `longest` bytes
        less the bytes tag (a hundred or so: one C-level pass)."""
        heads = self._heads
        if longest >= len(heads):
            heads.extend(bytes([_MEASURES_TAG]) + varint(n + 1) for n in range(len(heads), longest + 1))
        return list(map(add, islice(heads, longest + 1), repeat(times + bytes([_BYTES_TAG]))))


_HEADS = _Heads()


class SteadyEncoder:
    """The measure records of steady polls over one fixed list of counters (a poll plan's): the
    VM_RX measures in the order of `pairs`, then the VM_TX ones (build_batch interleaves them
    per counter; the order of a batch's measures means nothing)."""

    def __init__(self, pairs: Sequence[_Pair]) -> None:
        # C-level passes: an encoder is built again after every link event (a VM storm).
        self.pairs = list(pairs)
        self._templates = [*map(_RX_WIRE, pairs), *map(_TX_WIRE, pairs)]
        # (+ times, each template's length + times, the longest), made at the first encode
        self._base_lengths: tuple[int, list[int], int] | None = None
        # The counters already counted from the guest's side (macvtap), None for none; the
        # traffic types and their rows, the types None when they are all one (as a rule)
        self._unswapped = _flags(list(map(_UNSWAPPED, pairs)))
        self._types, self._traffic = _traffic_of(list(map(_TRAFFIC_TYPE, pairs)))

    def followed_by(self, kept: list[int], tail: Sequence[_Pair]) -> SteadyEncoder:
        """The encoder of this one's counters where `kept` is 1 (in their order), then `tail`'s:
        from this one's columns by C-level passes, no pass over every pair (a VM storm: the
        taps that stayed, then the new ones)."""
        n = len(self.pairs)
        new = SteadyEncoder.__new__(SteadyEncoder)
        new.pairs = [*compress(self.pairs, kept), *tail]
        templates = self._templates
        new._templates = [
            *compress(templates, kept),
            *map(_RX_WIRE, tail),
            *compress(islice(templates, n, None), kept),
            *map(_TX_WIRE, tail),
        ]
        new._base_lengths = None
        if self._base_lengths is not None:
            times, lengths, _longest = self._base_lengths
            tail_rx = list(map(add, map(len, map(_RX_WIRE, tail)), repeat(times)))
            tail_tx = list(map(add, map(len, map(_TX_WIRE, tail)), repeat(times)))
            rows = [*compress(lengths, kept), *tail_rx, *compress(islice(lengths, n, None), kept), *tail_tx]
            new._base_lengths = (times, rows, max(rows, default=times))
        # The flags and the types by a pass over every counter only when a counter is unswapped
        # or of another type
        tail_unswapped = list(map(_UNSWAPPED, tail))
        if self._unswapped is None and not any(tail_unswapped):
            new._unswapped = None
        else:
            flags = self._unswapped or [False] * n
            new._unswapped = _flags([*compress(flags, kept), *tail_unswapped])
        tail_types = list(map(_TRAFFIC_TYPE, tail))
        single = next(iter(self._traffic)) if self._types is None and self._traffic else None
        if single is not None and new.pairs and tail_types.count(single) == len(tail_types):
            new._types, new._traffic = None, {single: range(len(new.pairs))}
        else:
            types = self._types or ([single] * n if single is not None else [])
            new._types, new._traffic = _traffic_of([*compress(types, kept), *tail_types])
        return new

    def encode(
        self, deltas: ColumnDeltas, max_bytes: int | None = None
    ) -> tuple[list[bytes], int, dict[str, list[int]]]:
        """(the records in parts of at most max_bytes, how many records, VM-side bytes per
        traffic type: {type: [vm_rx, vm_tx]})."""
        parts, kept, totals = self.encode_parts(deltas, max_bytes)
        return list(map(b"".join, parts)), kept, totals

    def encode_parts(
        self, deltas: ColumnDeltas, max_bytes: int | None = None
    ) -> tuple[Iterator[list[bytes]], int, dict[str, list[int]]]:
        """As `encode`, each part made only when it is taken, as a few runs of records to be
        joined by the caller (behind a batch header, in the one copy it makes anyway): a big
        poll never holds every record's pieces at once, and no join gets more than
        _ONE_JOIN_PIECES pieces (at 10,000 interfaces one join of the whole poll took 6 MB)."""
        # Host tx is what the VM received (VM_RX), host rx what it sent, except for counters
        # that already count from the guest's side (macvtap).
        vm_rx_b, vm_tx_b = deltas.tx_bytes, deltas.rx_bytes
        vm_rx_p, vm_tx_p = deltas.tx_packets, deltas.rx_packets
        flags = self._unswapped
        if flags is not None:
            vm_rx_b = [r if u else t for u, r, t in zip(flags, deltas.rx_bytes, deltas.tx_bytes)]
            vm_tx_b = [t if u else r for u, r, t in zip(flags, deltas.rx_bytes, deltas.tx_bytes)]
            vm_rx_p = [r if u else t for u, r, t in zip(flags, deltas.rx_packets, deltas.tx_packets)]
            vm_tx_p = [t if u else r for u, r, t in zip(flags, deltas.rx_packets, deltas.tx_packets)]
        nbytes = vm_rx_b + vm_tx_b
        npackets = vm_rx_p + vm_tx_p
        n = len(nbytes)
        if n != len(self._templates):
            raise ValueError(f"{n // 2} counters for an encoder of {len(self._templates) // 2}")
        times = bytes([_START_TAG]) + varint(deltas.start_ms) + bytes([_END_TAG]) + varint(deltas.end_ms)
        bases, longest = self._lengths_with(len(times))  # longest: a record's, times included
        heads = _HEADS.for_poll(longest + _MAX_COUNTS, times)
        templates = self._templates
        moved = list(map(or_, nbytes, npackets))  # a direction that moved nothing has no measure
        kept = n - moved.count(0)
        if kept < n:
            nbytes, npackets, bases, templates = (
                list(compress(column, moved)) for column in (nbytes, npackets, bases, templates)
            )
        # Records of at most max_bytes together: as many per part as the longest record could
        # be allows (a head is at most 3 bytes: records stay far below 2 MB).
        per_part = kept
        if max_bytes is not None and kept * (longest + _MAX_COUNTS + 3) > max_bytes:
            longest += 2 + varint_size(max(nbytes)) + varint_size(max(npackets))
            per_part = max(1, max_bytes // (longest + 3))
        parts = self._parts(nbytes, npackets, bases, templates, heads, max(per_part, 1))
        return parts, kept, self._totals(vm_rx_b, vm_tx_b)

    def _parts(
        self,
        nbytes: list[int],
        npackets: list[int],
        bases: list[int],
        templates: list[bytes],
        heads: list[bytes],
        per_part: int,
    ) -> Iterator[list[bytes]]:
        """Each part's records, as one run, or runs of _JOIN_PIECES pieces when it is bigger.
        Lists are laid in by slices, no step per record: the values to pack, and the records'
        pieces in one flat list (head, counts, template per record; no tuple each for the
        garbage collector to look at). `heads`: the poll's, by the record's length less one."""
        for start in range(0, len(nbytes), per_part):
            end = start + per_part
            part_bytes = nbytes[start:end]
            m = len(part_bytes)
            values = [0, _PACKETS_TAG, 0] * m
            values[0::3] = part_bytes
            values[2::3] = npackets[start:end]
            counts = _COUNTS.findall(packed_varints(values))
            pieces: list[bytes] = [b""] * (_PIECES * m)
            pieces[0::_PIECES] = map(heads.__getitem__, map(add, map(len, counts), bases[start:end]))
            pieces[1::_PIECES] = counts
            pieces[2::_PIECES] = templates[start:end]
            if len(pieces) <= _ONE_JOIN_PIECES:
                yield [b"".join(pieces)]
            else:
                yield [b"".join(pieces[i : i + _JOIN_PIECES]) for i in range(0, len(pieces), _JOIN_PIECES)]

    def _lengths_with(self, times: int) -> tuple[list[int], int]:
        """Each record's length less its counts: template + times (the same from poll to poll
        while timestamps keep their number of digits), and the longest of them."""
        base = self._base_lengths
        if base is None or base[0] != times:
            lengths = list(map(add, map(len, self._templates), repeat(times)))
            base = self._base_lengths = (times, lengths, max(lengths, default=times))
        return base[1], base[2]

    def _totals(self, vm_rx: list[int], vm_tx: list[int]) -> dict[str, list[int]]:
        if len(self._traffic) == 1:
            (traffic,) = self._traffic
            return {traffic: [sum(vm_rx), sum(vm_tx)]}
        return {
            traffic: [sum(map(vm_rx.__getitem__, rows)), sum(map(vm_tx.__getitem__, rows))]
            for traffic, rows in self._traffic.items()
        }


def _flags(unswapped: list[bool]) -> list[bool] | None:
    return unswapped if any(unswapped) else None


def _traffic_of(types: list[str]) -> tuple[list[str] | None, dict[str, Sequence[int]]]:
    """(`types`, None when they are all one; the rows of each traffic type)."""
    if not types:
        return None, {}
    if types.count(types[0]) == len(types):
        return None, {types[0]: range(len(types))}
    traffic: dict[str, list[int]] = {}
    for i, traffic_type in enumerate(types):
        traffic.setdefault(traffic_type, []).append(i)
    return types, dict(traffic)


def split_fields(data: bytes, max_bytes: int) -> list[bytes]:
    """Length-delimited fields of a message (measure or inventory records) in runs of at most
    max_bytes each (a single larger field goes alone). A Python step per field: for the polls
    that do not run by columns, and for inventories."""
    if len(data) <= max_bytes:
        return [data] if data else []
    parts = []
    start = pos = 0
    end = len(data)
    while pos < end:
        if data[pos] & 0x87 != 0x02:  # a single-byte tag of wire type 2, field 1..15
            raise ValueError(f"not a length-delimited field at offset {pos}")
        length, shift, cursor = 0, 0, pos + 1
        while True:
            byte = data[cursor]
            cursor += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        field_end = cursor + length
        if field_end - start > max_bytes and pos > start:
            parts.append(data[start:pos])
            start = pos
        pos = field_end
    parts.append(data[start:])
    return parts
