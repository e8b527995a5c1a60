"""Files input: CloudStack event-bus JSON lines (one record value per line) from a file, followed
as it grows (the all-in-one's [lifecycle] events_file) or read once (`kvmeter ingest --events`).

Reads only whole lines when following, so a writer caught mid-line is read next time. Every start
reads the file from the top: events are stored once by their digest, so a re-read changes
nothing, and there is nothing to acknowledge. A followed file stays open between polls: when
another file takes its name (logrotate renames it, creates a new one) the old one is read to its
end first, so what its writer appended since the last poll is not skipped. A file truncated in
place (logrotate's copytruncate) had its unread end copied first: the copy is the sibling
(`<name>.1`, `<name>-<date>`) whose first bytes are exactly those read, and is read to its end
like a renamed file; with no such copy the unread end is gone, which is logged and counted. The
store keeps where the read stood (offset, digest of the bytes before it): a start that finds
another file under the name reads the end of the one rotated away while stopped first, found
the same way.

Delivery order (the clock-skew rule's input): one counter per file name, never reset by a
rotation, a truncation, a restart or another `kvmeter ingest` of a file of that name (the store
keeps its high-water mark with the events), so a later line always has a later place whatever
file it is in. A line read again after a restart gets a new place, but its event is stored
already and keeps its first.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from sqlalchemy.engine import Connection

from kvmeter.collector.inputs import LIFECYCLE, Delivery
from kvmeter.collector.model import Record

if TYPE_CHECKING:
    from kvmeter.collector.store import Store

log = logging.getLogger(__name__)

CHUNK = 500  # records per delivery: one transaction each
CHUNKS_PER_POLL = 20  # a long backlog is read in parts, never whole into memory
COPIES_CHECKED = 8  # the newest rotated siblings compared with what was read after a truncation
TAIL = 4096  # bytes before the offset checked each poll: a truncated file written past it again
# collector_state rows kept per followed file: the last delivery place given, and where the read
# stood (offset, line, digest of the bytes before it) to find a file rotated away while stopped.
_KEPT = ("events_file", "events_file_offset", "events_file_line", "events_file_digest")
# Compressed copies cannot be compared or read: logrotate's delaycompress keeps `.1` plain.
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".Z")


class EventsFile:
    def __init__(
        self,
        path: Path,
        *,
        label: str = "",
        follow: bool = True,
        chunk: int = CHUNK,
        store: Store | None = None,
        resume: bool = True,
        lost: Callable[[], None] = lambda: None,
    ):
        """`store`: keeps the delivery order's high-water mark and, with `resume`, where the read
        stands (None: both start at 0 each run); `resume` False (`kvmeter ingest`): the file is
        read from its top, only the order continues: another file of the same name ingested
        later (the next day's export) has later places, never places its lines did not take;
        `lost`: called for each truncation whose unread end could not be recovered."""
        self.path = path
        self.label = label or str(path)  # names the file in records' origins
        self.follow = follow  # a last line without its newline waits for it (the writer is mid-line)
        self.chunk = chunk
        self.store = store
        self.resume = resume
        self.lost = lost
        self.offset = 0
        self.line = 0  # the line number in the file read (origins)
        self.seq = 0  # the last delivery place given (orders)
        self.truncations_unrecovered = 0
        self._digest = hashlib.sha256()  # of the file's bytes before the offset
        self._tail = b""  # the last bytes before the offset, as read
        self._file: tuple[int, int] | None = None  # (device, inode) of the file the offset is in
        self._handle: BinaryIO | None = None  # that file, open while following
        self._at_end = False

    def start(self) -> None:
        if self.store is None:
            return
        with self.store.read() as conn:
            seq, offset, line, digest = (self.store.input_position(conn, n) for n in self._kept())
        self.seq = max(self.seq, seq)
        if offset and self._handle is None and self.resume:
            self._resume(offset, line, digest)

    def _resume(self, offset: int, line: int, digest: int) -> None:
        """Where the last run stood. A file that still begins with what it read is read from its
        top as ever (what it read is stored). Else that file was rotated away while stopped: its
        end is read first, from the sibling that begins with what was read."""
        try:
            with open(self.path, "rb") as f:
                if _size(f) >= offset and _short(_prefix_digest(f, offset)) == digest:
                    return
        except FileNotFoundError:
            pass
        self.offset, self.line = offset, line
        found = self._copy(digest)
        if found is None:
            self._unrecovered("rotated while stopped")
            self._restart(None)
            return
        self._handle, self._digest = found
        self._file = _identity(self._handle)

    def poll(self, timeout: float, *, measures: bool = True) -> list[Delivery]:
        return self._deliveries(self.read_new(limit=self.chunk * CHUNKS_PER_POLL))

    def caught_up(self) -> bool:
        return self._at_end

    def status(self) -> dict[str, Any]:
        return {
            "events_file": str(self.path),
            "events_file_lines": self.line,
            "events_file_truncations_unrecovered": self.truncations_unrecovered,
        }

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.close()

    def read_new(self, limit: int | None = None) -> list[Record]:
        """Records of the lines added since the last call (at most `limit`)."""
        records: list[Record] = []
        self._at_end = False
        named = _identity(self.path)
        if self._handle is not None and named == self._file and self._shrunk():
            self._truncated()  # in place: go on in its copy, if there is one
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
            ident = _identity(handle)
            # Another file is known by its inode, whatever its size: one at least as long as
            # what was read of the old one would otherwise be read from the old offset.
            if ident != self._file:
                self._restart(ident)
            self._handle = handle
            if _size(handle) < self.offset:  # truncated while it was not open (read once)
                self._restart(ident)
        done = self._read(self._handle, records, limit)
        if not self.follow:
            self.close()  # read once: nothing to keep open
        self._at_end = done
        return records

    def _restart(self, ident: tuple[int, int] | None) -> None:
        self._file = ident
        self.offset = self.line = 0
        self._digest = hashlib.sha256()
        self._tail = b""

    def _shrunk(self) -> bool:
        """Truncated in place since the last poll: shorter than what was read of it, or no longer
        holding what was read just before the offset (truncated, then written past it again)."""
        assert self._handle is not None
        fd = self._handle.fileno()
        if os.fstat(fd).st_size < self.offset:
            return True
        return bool(self._tail) and os.pread(fd, len(self._tail), self.offset - len(self._tail)) != self._tail

    def _truncated(self) -> None:
        """The followed file is shorter than what was read of it: truncated in place. Its end not
        read yet is in its copy, if one is found: follow the copy, which the name no longer
        names, so it is read to its end before the file is read again from its top."""
        found = self._copy(_short(self._digest))
        if found is not None:
            log.warning(
                "events file %s truncated: reading the rest from its copy %s", self.path, found[0].name
            )
            self.close()
            self._handle, self._digest = found
            self._file = _identity(self._handle)
            return
        self._unrecovered("truncated")
        self._restart(self._file)

    def _unrecovered(self, what: str) -> None:
        self.truncations_unrecovered += 1
        self.lost()
        log.error(
            "events file %s %s after byte %d (line %d) was read, and no rotated copy begins with"
            " what was read: the lines written after it and before the rotation may be lost"
            " (logrotate: prefer create to copytruncate, keep `.1` uncompressed with delaycompress)",
            self.path, what, self.offset, self.line,
        )  # fmt: skip

    def _copy(self, want: int) -> tuple[BinaryIO, Any] | None:
        """The newest sibling `<name>.*` / `<name>-*` (not compressed) whose first `offset` bytes
        are those read (their digest `want`), opened, with the digest of those bytes; else None."""
        name = self.path.name
        candidates = []
        try:
            entries = list(os.scandir(self.path.parent))
        except OSError:
            return None
        for entry in entries:
            if not entry.name.startswith((name + ".", name + "-")) or entry.name.endswith(_COMPRESSED):
                continue
            try:
                st = entry.stat()
            except OSError:
                continue
            if entry.is_file() and st.st_size >= self.offset and (st.st_dev, st.st_ino) != self._file:
                candidates.append((st.st_mtime_ns, entry.path))
        for _, path in sorted(candidates, reverse=True)[:COPIES_CHECKED]:
            try:
                f = open(path, "rb")
            except OSError:
                continue
            digest = _prefix_digest(f, self.offset)
            if _short(digest) == want:
                return f, digest
            f.close()
        return None

    def _read(self, f: BinaryIO, records: list[Record], limit: int | None) -> bool:
        """Append the records of f's lines from the offset on; False when `limit` stopped it."""
        f.seek(self.offset)
        done = True
        for raw in f:
            if self.follow and not raw.endswith(b"\n"):
                break
            self.offset += len(raw)
            self.line += 1
            self.seq += 1
            self._digest.update(raw)
            value = raw.strip()
            if value:
                records.append(Record(value, None, f"{self.label}:{self.line}", (self.label, self.seq)))
                if limit is not None and len(records) >= limit:
                    done = False
                    break
        self._keep_tail(f)
        return done

    def _keep_tail(self, f: BinaryIO) -> None:
        n = min(self.offset, TAIL)
        self._tail = os.pread(f.fileno(), n, self.offset - n) if n else b""

    def _kept(self) -> list[str]:
        """Names of the collector_state rows kept for this file (its label's digest: any length)."""
        label = hashlib.sha256(self.label.encode()).hexdigest()[:40]
        return [f"{kind}:{label}" for kind in _KEPT]

    def _deliveries(self, records: list[Record]) -> list[Delivery]:
        """Chunks of `records`, each storing with its events the delivery order's high-water
        mark; the last also where the read stands (an older place only means more read again)."""
        parts = [records[i : i + self.chunk] for i in range(0, len(records), self.chunk)]
        if self.store is None:
            return [Delivery(LIFECYCLE, part) for part in parts]
        store, names = self.store, self._kept()
        stand = dict(zip(names[1:], (self.offset, self.line, _short(self._digest)), strict=True))
        stand = stand if self.resume else {}

        def keeping(seq: int, position: dict[str, int]) -> Callable[[Connection], None]:
            def keep(conn: Connection) -> None:
                store.set_input_position(conn, names[0], seq, rising=True)
                for name, value in position.items():
                    store.set_input_position(conn, name, value)

            return keep

        return [
            Delivery(LIFECYCLE, part, within=keeping(_place(part[-1]), stand if i == len(parts) - 1 else {}))
            for i, part in enumerate(parts)
        ]


def _place(rec: Record) -> int:
    return rec.order[1] if rec.order is not None else 0


def _identity(what: Path | BinaryIO) -> tuple[int, int] | None:
    try:
        st = os.stat(what) if isinstance(what, Path) else os.fstat(what.fileno())
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def _size(f: BinaryIO) -> int:
    return os.fstat(f.fileno()).st_size


def _prefix_digest(f: BinaryIO, length: int) -> Any:
    """The sha256 object of f's first `length` bytes (f left after them)."""
    f.seek(0)
    digest = hashlib.sha256()
    while length > 0:
        block = f.read(min(length, 1 << 20))
        if not block:
            break
        digest.update(block)
        length -= len(block)
    return digest


def _short(digest: Any) -> int:
    """A digest as a signed 64-bit number (a collector_state value): enough to tell files apart."""
    return int.from_bytes(digest.digest()[:8], "big", signed=True)
