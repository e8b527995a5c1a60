"""Batch ingest for backfills and audits: event and measure files through the live code path.

Events: JSON lines, each the bare value of one event-bus record (CloudStack's Kafka value).
Measures: length-delimited protobuf MeasureBatch records (varint length prefix, Java's
writeDelimitedTo), or the agent's `--once --format json` output: JSON objects of MeasureBatch
(protobuf's JSON mapping), concatenated, one per line or in an array. The form is detected:
a file that parses as JSON is JSON (a protobuf record essentially never is).
Unreadable records are dead-lettered like bad messages on the topics; the rest goes on.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from google.protobuf import json_format

from kvmeter.collector.feed import drain
from kvmeter.collector.input_files import CHUNK, EventsFile
from kvmeter.collector.model import DeadLetter, Outcome, Record
from kvmeter.collector.service import MEASURES, Collector
from kvmeter.proto import pb

MAX_RECORD_BYTES = 256 << 20
TRUNCATED = "truncated_record"
MALFORMED_JSON = "malformed_json"
MALFORMED_BATCH_JSON = "malformed_batch_json"


def ingest_events(collector: Collector, path: Path) -> Outcome:
    # The order of the file's name continues from the store's (the clock-skew rule compares
    # places): a file of the same name ingested before had the earlier ones.
    events = EventsFile(path, label=path.name, follow=False, chunk=CHUNK, store=collector.store, resume=False)
    return drain(collector, events)


def ingest_measures(collector: Collector, path: Path) -> Outcome:
    out = Outcome()
    chunk: list[Record] = []
    letters: list[DeadLetter] = []
    with path.open("rb") as fh:
        for item in _measure_records(fh, path.name):
            if isinstance(item, DeadLetter):
                letters.append(item)
                continue
            chunk.append(item)
            if len(chunk) >= CHUNK:
                out.add(collector.apply_batches(chunk))
                chunk = []
    if chunk:
        out.add(collector.apply_batches(chunk))
    if letters:
        with collector.store.write() as conn:
            collector.store.dead_letter(conn, letters, collector.clock())
        out.dead_letters.extend(letters)
    return out


def _measure_records(fh: BinaryIO, name: str) -> Iterator[Record | DeadLetter]:
    """Records of either form; a large protobuf file is streamed, never read whole."""
    head = fh.read(1 << 16).lstrip()
    fh.seek(0)
    if head[:1] in (b"{", b"["):
        data = fh.read()
        if _looks_like_json(data):
            return _json_records(data, name)
        return _delimited_records(io.BytesIO(data), name)
    return _delimited_records(fh, name)


def _looks_like_json(data: bytes) -> bool:
    try:
        json.JSONDecoder().raw_decode(data.lstrip().decode("utf-8"))
    except RecursionError:  # JSON, nested deeper than the parser goes: dead-lettered as such
        return True
    except (UnicodeDecodeError, ValueError):
        return False
    return True


def _delimited_records(fh: BinaryIO, name: str) -> Iterator[Record | DeadLetter]:
    number = 0
    while True:
        prefix = bytearray()
        length, shift = 0, 0
        while True:
            byte = fh.read(1)
            if not byte:
                if prefix:
                    yield DeadLetter(
                        MEASURES,
                        f"{name}#{number + 1}",
                        bytes(prefix),
                        TRUNCATED,
                        "file ends inside a length",
                    )
                return
            prefix += byte
            length |= (byte[0] & 0x7F) << shift
            shift += 7
            if not byte[0] & 0x80:
                break
            if shift > 63:
                yield DeadLetter(
                    MEASURES, f"{name}#{number + 1}", bytes(prefix) + fh.read(), TRUNCATED, "no valid length"
                )
                return
        number += 1
        if length > MAX_RECORD_BYTES:  # a corrupt length: do not try to read exabytes
            message = f"record {number} says {length} bytes, more than {MAX_RECORD_BYTES}"
            yield DeadLetter(MEASURES, f"{name}#{number}", bytes(prefix) + fh.read(1024), TRUNCATED, message)
            return
        value = fh.read(length)
        if len(value) < length:
            message = f"record {number} says {length} bytes, {len(value)} left in the file"
            yield DeadLetter(MEASURES, f"{name}#{number}", bytes(prefix) + value, TRUNCATED, message)
            return
        yield Record(value, None, f"{name}#{number}")


def _json_records(data: bytes, name: str) -> Iterator[Record | DeadLetter]:
    text = data.decode("utf-8")
    decoder = json.JSONDecoder()
    pos, number = 0, 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            return
        number += 1
        try:
            doc, end = decoder.raw_decode(text, pos)
        except (ValueError, RecursionError) as exc:
            yield DeadLetter(MEASURES, f"{name}#{number}", text[pos:].encode(), MALFORMED_JSON, str(exc))
            return
        raw, pos = text[pos:end].encode(), end
        for item in doc if isinstance(doc, list) else [doc]:
            try:
                if not isinstance(item, dict):
                    raise json_format.ParseError(f"a {type(item).__name__}, not an object")
                yield Record(
                    json_format.ParseDict(item, pb.MeasureBatch()).SerializeToString(),
                    None,
                    f"{name}#{number}",
                )
            except (json_format.ParseError, ValueError, TypeError) as exc:
                yield DeadLetter(
                    MEASURES, f"{name}#{number}", raw, MALFORMED_BATCH_JSON, f"not a MeasureBatch: {exc}"
                )


def ingest(collector: Collector, events: list[Path], measures: list[Path]) -> Outcome:
    """Events first (so measures find their owners), then measures, then close what can close."""
    out = Outcome()
    for path in events:
        out.add(ingest_events(collector, path))
    for path in measures:
        out.add(ingest_measures(collector, path))
    out.add(collector.tick())
    return out
