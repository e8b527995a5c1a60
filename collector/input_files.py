"""Files input: CloudStack event-bus JSON lines (one record value per line) from a file, followed
as it grows (the all-in-one's [lifecycle] events_file) or read once (`kvmeter ingest --events`).

Reads only whole lines when following, so a writer caught mid-line is read next time. Every start
reads the file from the top: events are stored once by their digest, so a re-read changes
nothing, and there is nothing to acknowledge. A followed file stays open between polls: when
another file takes its name (logrotate renames it, creates a new one) the old one is read to its
end first, so what its writer appended since the last poll is not skipped.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, BinaryIO

from kvmeter.collector.inputs import LIFECYCLE, Delivery
from kvmeter.collector.model import Record

CHUNK = 500  # records per delivery: one transaction each
CHUNKS_PER_POLL = 20  # a long backlog is read in parts, never whole into memory


class EventsFile:
    def __init__(self, path: Path, *, label: str = "", follow: bool = True, chunk: int = CHUNK):
        self.path = path
        self.label = label or str(path)  # names the file in records' origins
        self.follow = follow  # a last line without its newline waits for it (the writer is mid-line)
        self.chunk = chunk
        self.offset = 0
        self.line = 0
        self._file: tuple[int, int] | None = None  # (device, inode) of the file the offset is in
        self._handle: BinaryIO | None = None  # that file, open while following
        self._at_end = False

    def start(self) -> None:
        pass

    def poll(self, timeout: float, *, measures: bool = True) -> list[Delivery]:
        records = self.read_new(limit=self.chunk * CHUNKS_PER_POLL)
        return [Delivery(LIFECYCLE, records[i : i + self.chunk]) for i in range(0, len(records), self.chunk)]

    def caught_up(self) -> bool:
        return self._at_end

    def status(self) -> dict[str, Any]:
        return {"events_file": str(self.path), "events_file_lines": self.line}

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.close()

    def read_new(self, limit: int | None = None) -> list[Record]:
        """Records of the lines added since the last call (at most `limit`)."""
        records: list[Record] = []
        self._at_end = False
        try:
            st = os.stat(self.path)
            named: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            named = None
        if self._handle is not None and named != self._file:
            # Renamed away (or removed): its writer may have appended since the last poll. Read
            # it to its end before the file that takes its name; gone for good, keep following it.
            if not self._read(self._handle, records, limit):
                return records
            if named is None:
                self._at_end = True
                return records
            self.close()
        if self._handle is None:
            if named is None:
                self._at_end = True
                return records
            try:
                handle = open(self.path, "rb")
            except FileNotFoundError:
                self._at_end = True
                return records
            st = os.fstat(handle.fileno())
            ident = (st.st_dev, st.st_ino)
            # Another file is known by its inode, whatever its size: one at least as long as
            # what was read of the old one would otherwise be read from the old offset.
            if ident != self._file:
                self.offset = self.line = 0
                self._file = ident
            self._handle = handle
        if os.fstat(self._handle.fileno()).st_size < self.offset:  # truncated: start over
            self.offset = self.line = 0
        done = self._read(self._handle, records, limit)
        if not self.follow:
            self.close()  # read once: nothing to keep open
        self._at_end = done
        return records

    def _read(self, f: BinaryIO, records: list[Record], limit: int | None) -> bool:
        """Append the records of f's lines from the offset on; False when `limit` stopped it."""
        f.seek(self.offset)
        for raw in f:
            if self.follow and not raw.endswith(b"\n"):
                break
            self.offset += len(raw)
            self.line += 1
            value = raw.strip()
            if value:
                records.append(Record(value, None, f"{self.label}:{self.line}", (self.label, self.line)))
                if limit is not None and len(records) >= limit:
                    return False
        return True
