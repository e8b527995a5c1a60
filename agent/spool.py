"""The durable spool: every batch on disk (fsync) before it is published, with the counter state.

Layout of the spool directory:
  seg-<n>.kvs   append-only segments of frames: u32 length, u32 CRC32, msgpack payload
                [stream_id, seq, batch bytes, counter state, written at (ms)]
  ack.msgpack   the position of the first frame not yet delivered {"segment": n, "offset": n},
                overwritten in place

A poll's frames are the unit of atomicity: its batches (one, or several when a poll is bigger
than a record may be) and the counter state they were computed against (in the last frame; the
others carry none) are written, flushed and fsynced together, so a crash leaves either all or
none (a torn tail is detected by its length or CRC, and frames after the last one with a state
by their missing state, and truncated on open). On restart the last frame's state resumes
the delta engine and every frame after the ack position is re-published in order under its own
stream id and sequence number. The ack file is overwritten in place and may lag: a lagging ack only
re-sends batches the collector already has, which it drops by (stream, seq).
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from kvmeter.agent.spool_drops import DroppedBatches
from kvmeter.agent.spool_frames import HEADER, frame_pieces, read_frames
from kvmeter.agent.spool_io import fsync_dir, write_all
from kvmeter.agent.state_pack import StatePacker

log = logging.getLogger(__name__)

SEGMENT_GLOB = "seg-*.kvs"
ACK_RECORD_BYTES = 34  # {"segment": u64, "offset": u64} in msgpack


def _segment_name(number: int) -> str:
    return f"seg-{number:012d}.kvs"


@dataclass
class Frame:
    """Where one spooled batch sits; the batch bytes themselves are read back on demand."""

    stream_id: str
    seq: int
    segment: int
    offset: int
    size: int  # header + payload
    written_ms: int
    acked: bool = field(default=False, compare=False)
    # Handed to the producer and not yet answered: dropped at the bound, it may still be delivered
    handed: bool = field(default=False, compare=False)

    @property
    def position(self) -> tuple[int, int]:
        return (self.segment, self.offset)


class SpoolError(RuntimeError):
    """The spool directory cannot be used."""


class Spool:
    """Append, read back, acknowledge and bound spooled batches. Not thread-safe: one owner."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_bytes: int = 1 << 30,
        max_age_ms: int = 7 * 24 * 3600 * 1000,
        segment_bytes: int = 4 << 20,
        read_only: bool = False,
        on_drop: Callable[[Frame, bytes], None] | None = None,
    ) -> None:
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.max_age_ms = max_age_ms
        self.segment_bytes = segment_bytes
        self.read_only = read_only
        self.drops = DroppedBatches(on_drop)
        self._pending: deque[Frame] = deque()  # appended, not yet acknowledged, in order
        self._pending_bytes = 0  # their sizes, summed as they come and go
        # The batches of the last poll written, by position: the publisher takes them right
        # away, and reading them back from the file would cost a read and a decode per poll.
        self._just_written: dict[tuple[int, int], bytes] = {}
        self._last_state: dict[str, Any] | None = None
        self._state_packer = StatePacker()
        self._last_frame: Frame | None = None
        self._segments: list[int] = []
        self._active_size = 0
        self._active: Any = None  # file object of the newest segment (append mode)
        self._ack_fd: int | None = None  # ack.msgpack, opened at the first acknowledgement
        # A poll whose write or fsync failed left bytes past _active_size that could not be cut
        # off yet: nothing is written behind them (see _cut_back)
        self._uncut = False
        self.dropped_frames = 0
        self.dropped_bytes = 0  # spool bytes given up because of the size or age bound
        self._open()

    # -- open and recover ---------------------------------------------------------------------

    def _open(self) -> None:
        if not self.read_only:
            self.dir.mkdir(parents=True, exist_ok=True)
        elif not self.dir.is_dir():
            return
        ack = self._read_ack()
        self._segments = sorted(int(p.name[4:-4]) for p in self.dir.glob(SEGMENT_GLOB))
        scanned = [found for number in self._segments for found in self._scan(number)]
        complete = len(scanned)
        while complete and scanned[complete - 1][1] is None:
            complete -= 1  # the first frames of a poll whose last frame (with the state) is missing
        if complete < len(scanned):
            self._drop_tail([frame for frame, _ in scanned[complete:]])
        for frame, state in scanned[:complete]:
            if state is not None:
                self._last_state = state
            self._last_frame = frame
            if frame.position >= ack:
                self._pending.append(frame)
                self._pending_bytes += frame.size
        if not self.read_only:
            self._delete_acked_segments()
            if self._segments:
                self._active_size = (self.dir / _segment_name(self._segments[-1])).stat().st_size

    def _read_ack(self) -> tuple[int, int]:
        try:
            data = msgpack.unpackb((self.dir / "ack.msgpack").read_bytes())
            return (int(data["segment"]), int(data["offset"]))
        except FileNotFoundError:
            return (0, 0)
        except Exception as exc:  # a damaged ack file only means re-sending: never fatal
            log.warning("spool ack file unreadable (%s): re-sending everything spooled", exc)
            return (0, 0)

    def _drop_tail(self, frames: list[Frame]) -> None:
        first = frames[0]
        log.warning(
            "spool: dropping %d frame(s) of an interrupted poll (stream %s seq %d..%d): its "
            "counter state was never written, so it is measured again",
            len(frames),
            first.stream_id,
            first.seq,
            frames[-1].seq,
        )
        if self.read_only:
            return
        with open(self.dir / _segment_name(first.segment), "r+b") as f:
            f.truncate(first.offset)
            f.flush()
            os.fsync(f.fileno())
        for number in [n for n in self._segments if n > first.segment]:
            (self.dir / _segment_name(number)).unlink()
            self._segments.remove(number)

    def _scan(self, number: int) -> list[tuple[Frame, dict[str, Any] | None]]:
        path = self.dir / _segment_name(number)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            if not self.read_only:
                raise
            return []  # a reader beside the owner: delivered and deleted since the listing
        found, problem, end = read_frames(data)
        if problem is not None:
            log.warning(
                "spool %s: %s at offset %d; dropping the %d trailing bytes (an interrupted write)",
                path.name,
                problem,
                end,
                len(data) - end,
            )
            if not self.read_only:
                with open(path, "r+b") as f:
                    f.truncate(end)
                    f.flush()
                    os.fsync(f.fileno())
        return [(Frame(f.stream_id, f.seq, number, f.offset, f.size, f.written_ms), f.state) for f in found]

    # -- append -------------------------------------------------------------------------------

    def append(self, stream_id: str, seq: int, batch: bytes, state: dict[str, Any], now_ms: int) -> Frame:
        """Write one frame durably (fsync) and return it; the caller publishes only after this."""
        return self.append_poll(stream_id, seq, [batch], state, now_ms)[-1]

    def append_poll(
        self, stream_id: str, first_seq: int, batches: list[bytes], state: dict[str, Any], now_ms: int
    ) -> list[Frame]:
        """Write one poll's batches (sequence numbers first_seq, first_seq + 1, ...) and the
        counter state durably, in one write and one fsync; the state goes with the last."""
        if self.read_only:
            raise SpoolError("spool opened read-only")
        if not batches:
            raise ValueError("a poll has at least one batch")
        if self._uncut:
            self._cut_back()
        if self._active is None or self._active_size >= self.segment_bytes:
            self._rotate()
        # The frames go to the file as pieces (os.writev): a poll's batch is a few hundred KB,
        # and joining header, payload and records first would copy it three times more, each
        # copy in fresh pages (a minor fault per 4 KB, the costliest part of appending).
        pieces: list[Any] = []
        sizes = []
        packed_state = self._state_packer.pack(state)
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            frame = frame_pieces(stream_id, first_seq + i, batch, packed_state if last else None, now_ms)
            pieces += frame
            sizes.append(sum(map(len, frame)))
        fd = self._active.fileno()
        try:
            write_all(fd, pieces)
            os.fsync(fd)
        except BaseException:
            # The caller undoes the poll and measures it again under the same sequence numbers:
            # none of this write may stay (whole frames would be read back on open as a spooled
            # poll, a torn one would cut off every frame written after it).
            self._uncut = True
            try:
                self._cut_back()
            except OSError as exc:
                log.error("spool: cannot cut the failed write off yet (%s): the next append does", exc)
            raise
        frames = []
        self._just_written = {}
        for i, size in enumerate(sizes):
            frames.append(
                Frame(stream_id, first_seq + i, self._segments[-1], self._active_size, size, now_ms)
            )
            self._just_written[frames[-1].position] = batches[i]
            self._active_size += size
        self._pending.extend(frames)
        self._pending_bytes += sum(f.size for f in frames)
        self._last_state, self._last_frame = state, frames[-1]
        self._enforce_bounds(now_ms)
        return frames

    def _cut_back(self) -> None:
        """Cut the active segment back to the end of its last poll written whole."""
        fd = self._active.fileno()
        os.ftruncate(fd, self._active_size)
        os.fsync(fd)
        self._uncut = False

    def _rotate(self) -> None:
        restarted = self._active is None
        if self._active is not None:
            self._active.close()
            self._active = None  # a failed open below must not leave the closed file active
        if self._segments and restarted and self._active_size < self.segment_bytes:
            number = self._segments[-1]  # reopen the newest segment after a restart
        else:
            number = (self._segments[-1] + 1) if self._segments else 1
            self._segments.append(number)
            self._active_size = 0
        self._active = open(self.dir / _segment_name(number), "ab", buffering=0)
        fsync_dir(self.dir)

    # -- read back, acknowledge, bound --------------------------------------------------------

    def pending(self) -> list[Frame]:
        """Frames not yet acknowledged, oldest first."""
        return list(self._pending)

    def pending_count(self) -> int:
        return len(self._pending)

    def pending_from(self, position: tuple[int, int]) -> list[Frame]:
        """The pending frames at or after `position`, oldest first: read from the newest end, so
        a publisher that has handed most of a long backlog over already reads only the rest."""
        newer = []
        for frame in reversed(self._pending):
            if frame.position < position:
                break
            newer.append(frame)
        newer.reverse()
        return newer

    def read_batch(self, frame: Frame) -> bytes:
        written = self._just_written.pop(frame.position, None)
        if written is not None:
            return written
        with open(self.dir / _segment_name(frame.segment), "rb") as f:
            f.seek(frame.offset)
            record = f.read(frame.size)
        payload = record[HEADER.size :]
        return bytes(msgpack.unpackb(payload, raw=False)[2])

    def last_state(self) -> dict[str, Any] | None:
        """The counter state saved with the newest frame (None: nothing spooled yet)."""
        return self._last_state

    def ack(self, frame: Frame) -> None:
        """The broker has this frame: advance the ack position over every delivered prefix."""
        frame.acked = True
        advanced = False
        while self._pending and self._pending[0].acked:
            self._pending_bytes -= self._pending.popleft().size
            advanced = True
        if advanced:
            self._write_ack()
            self._delete_acked_segments()

    def _ack_position(self) -> tuple[int, int]:
        if self._pending:
            return self._pending[0].position
        if self._last_frame is not None:
            return (self._last_frame.segment, self._last_frame.offset + self._last_frame.size)
        return (0, 0)

    def _write_ack(self) -> None:
        """The ack position, overwritten in place (one pwrite into a kept file descriptor): a new
        file renamed over the old one cost half a millisecond of CPU per delivery on ext4. The
        record has a fixed length (msgpack's 64-bit integers), so each write replaces the whole
        of it; a stale or damaged ack only means re-sending what the collector already has."""
        segment, offset = self._ack_position()
        if self._ack_fd is not None and os.fstat(self._ack_fd).st_nlink == 0:  # removed meanwhile
            os.close(self._ack_fd)
            self._ack_fd = None
        if self._ack_fd is None:
            self._ack_fd = os.open(self.dir / "ack.msgpack", os.O_WRONLY | os.O_CREAT, 0o644)
            os.ftruncate(self._ack_fd, ACK_RECORD_BYTES)
        position = (segment.to_bytes(8, "big"), offset.to_bytes(8, "big"))
        os.pwrite(self._ack_fd, b"\x82\xa7segment\xcf%b\xa6offset\xcf%b" % position, 0)

    def _delete_acked_segments(self) -> None:
        first_needed = self._ack_position()[0]
        # The newest segment always stays: its last frame holds the state to resume from.
        while len(self._segments) > 1 and self._segments[0] < first_needed:
            number = self._segments.pop(0)
            try:
                (self.dir / _segment_name(number)).unlink()
            except FileNotFoundError:
                pass

    def _enforce_bounds(self, now_ms: int) -> None:
        dropped = []
        while len(self._pending) > 1:  # never the frame just written
            oldest = self._pending[0]
            too_big = self.pending_bytes() > self.max_bytes
            too_old = now_ms - oldest.written_ms > self.max_age_ms
            if not (too_big or too_old):
                break
            self._pending.popleft()
            self._pending_bytes -= oldest.size
            self.dropped_frames += 1
            self.dropped_bytes += oldest.size
            dropped.append(oldest)
            if self.drops.wants_batch(oldest):
                # The poll is on disk already: the dropped batch unreadable (EIO on an old
                # segment) or not counted must not fail the append (the poll would be undone
                # and spooled again under the same sequence numbers)
                try:
                    batch = self.read_batch(oldest)
                except Exception as exc:
                    log.error("spool: dropped batch %s/%d unreadable: %s", oldest.stream_id, oldest.seq, exc)
                    batch = b""  # counted by its spool bytes
                self.drops.dropped(oldest, batch)
        if dropped:
            log.error(
                "SPOOL BOUND HIT (%d bytes max, %d s max age): dropped %d undelivered batches "
                "(stream %s seq %d..%d); is the broker reachable?",
                self.max_bytes,
                self.max_age_ms // 1000,
                len(dropped),
                dropped[0].stream_id,
                dropped[0].seq,
                dropped[-1].seq,
            )
            try:
                self._write_ack()
                self._delete_acked_segments()
            except OSError as exc:  # a lagging ack only re-sends; the next ack or drop writes it
                log.error("spool: ack position not written after the drop: %s", exc)

    def settle(self, frame: Frame, *, delivered: bool) -> None:
        """What became of a batch the producer held (spool_drops)."""
        self.drops.settle(frame, delivered=delivered)

    def pending_bytes(self) -> int:
        return self._pending_bytes

    def oldest_pending_ms(self) -> int | None:
        return self._pending[0].written_ms if self._pending else None

    def close(self) -> None:
        if self._active is not None:
            self._active.close()
            self._active = None
        if self._ack_fd is not None:
            os.close(self._ack_fd)
            self._ack_fd = None
