"""Files input: CloudStack event-bus JSON lines (one record value per line) from a file, followed
as it grows (the all-in-one's [lifecycle] events_file) or read once (`kvmeter ingest --events`).

Reads only whole lines when following, so a writer caught mid-line is read next time. Every start
reads the file from the top: events are stored once by their digest, so a re-read changes
nothing, and there is nothing to acknowledge.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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
        pass

    def read_new(self, limit: int | None = None) -> list[Record]:
        """Records of the lines added since the last call (at most `limit`)."""
        records: list[Record] = []
        self._at_end = False
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                ident = (st.st_dev, st.st_ino)
                # Truncated, or replaced by another file (renamed over it, re-created): start over.
                # Another file is known by its inode, whatever its size: one at least as long as
                # what was read of the old one would otherwise be read from the old offset.
                if ident != self._file or st.st_size < self.offset:
                    self.offset = self.line = 0
                    self._file = ident
                f.seek(self.offset)
                for raw in f:
                    if self.follow and not raw.endswith(b"\n"):
                        break
                    self.offset += len(raw)
                    self.line += 1
                    value = raw.strip()
                    if value:
                        origin = f"{self.label}:{self.line}"
                        records.append(Record(value, None, origin, (self.label, self.line)))
                        if limit is not None and len(records) >= limit:
                            return records
        except FileNotFoundError:
            pass
        self._at_end = True
        return records
