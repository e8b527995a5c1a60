"""The durable spool: frames survive restarts, torn tails are cut, acks advance, bounds drop loudly."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kvmeter.agent.spool import Frame, Spool

NOW = 1_700_000_000_000


def fill(spool: Spool, n: int, start: int = 1, stream: str = "s1", size: int = 100) -> list[Frame]:
    return [
        spool.append(stream, seq, bytes([seq % 256]) * size, {"seq": seq}, NOW + seq)
        for seq in range(start, start + n)
    ]


def test_frames_survive_reopen_in_order_with_the_last_state(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    fill(spool, 5)
    spool.close()
    again = Spool(tmp_path)
    assert [(f.stream_id, f.seq) for f in again.pending()] == [("s1", i) for i in range(1, 6)]
    assert again.last_state() == {"seq": 5}
    assert again.read_batch(again.pending()[2]) == bytes([3]) * 100


def test_acked_frames_are_not_replayed_and_state_is_kept(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_bytes=300)  # a few frames per segment
    frames = fill(spool, 10)
    for frame in frames[:7]:
        spool.ack(frame)
    spool.close()
    assert len(list(tmp_path.glob("seg-*.kvs"))) < 5  # fully delivered segments are deleted
    again = Spool(tmp_path, segment_bytes=300)
    assert [f.seq for f in again.pending()] == [8, 9, 10]
    assert again.last_state() == {"seq": 10}


def test_out_of_order_acks_advance_only_over_the_delivered_prefix(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    frames = fill(spool, 4)
    spool.ack(frames[1])
    spool.ack(frames[2])
    assert [f.seq for f in spool.pending()] == [1, 2, 3, 4]
    spool.ack(frames[0])
    assert [f.seq for f in spool.pending()] == [4]
    spool.close()
    assert [f.seq for f in Spool(tmp_path).pending()] == [4]


def test_everything_acked_still_resumes_from_the_last_state(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_bytes=200)
    for frame in fill(spool, 6):
        spool.ack(frame)
    spool.close()
    again = Spool(tmp_path, segment_bytes=200)
    assert again.pending() == []
    assert again.last_state() == {"seq": 6}
    fill(again, 1, start=7)
    again.close()
    assert [f.seq for f in Spool(tmp_path).pending()] == [7]


@pytest.mark.parametrize("cut", [1, 5, 9, 60])
def test_torn_tail_is_detected_and_truncated(
    tmp_path: Path, cut: int, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path)
    fill(spool, 3)
    spool.close()
    (segment,) = tmp_path.glob("seg-*.kvs")
    size = segment.stat().st_size
    with open(segment, "r+b") as f:
        f.truncate(size - cut)  # the last frame's write was interrupted
    with caplog.at_level(logging.WARNING):
        again = Spool(tmp_path)
    assert [f.seq for f in again.pending()] == [1, 2]
    assert again.last_state() == {"seq": 2}
    assert "interrupted write" in caplog.text
    fill(again, 1, start=3)  # appending after the cut yields a clean file
    again.close()
    assert [f.seq for f in Spool(tmp_path).pending()] == [1, 2, 3]


def test_corrupted_byte_is_caught_by_the_crc(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    frames = fill(spool, 3)
    spool.close()
    (segment,) = tmp_path.glob("seg-*.kvs")
    data = bytearray(segment.read_bytes())
    data[frames[2].offset + 20] ^= 0xFF
    segment.write_bytes(bytes(data))
    assert [f.seq for f in Spool(tmp_path).pending()] == [1, 2]


def test_size_bound_drops_oldest_loudly_and_counts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dropped: list[tuple[int, bytes]] = []
    spool = Spool(tmp_path, max_bytes=1000, on_drop=lambda f, b: dropped.append((f.seq, b)))
    with caplog.at_level(logging.ERROR):
        frames = fill(spool, 20)
    kept = [f.seq for f in spool.pending()]
    assert kept == list(range(20 - len(kept) + 1, 21))
    assert spool.pending_bytes() <= 1000
    assert [seq for seq, _ in dropped] == list(range(1, 21 - len(kept)))
    assert dropped[0][1] == bytes([1]) * 100
    assert spool.dropped_bytes == sum(f.size for f in frames[: len(dropped)])
    assert "SPOOL BOUND HIT" in caplog.text
    spool.close()


def test_age_bound_drops_old_frames(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_age_ms=10_000)
    spool.append("s1", 1, b"a", {}, NOW)
    spool.append("s1", 2, b"b", {}, NOW + 5_000)
    spool.append("s1", 3, b"c", {}, NOW + 12_000)
    assert [f.seq for f in spool.pending()] == [2, 3]
    assert spool.dropped_frames == 1
    spool.close()


def test_read_only_open_never_writes(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    fill(spool, 2)
    spool.close()
    (segment,) = tmp_path.glob("seg-*.kvs")
    with open(segment, "ab") as f:
        f.write(b"\x00\x00")  # torn
    ro = Spool(tmp_path, read_only=True)
    assert ro.last_state() == {"seq": 2}
    assert segment.read_bytes().endswith(b"\x00\x00")
    assert Spool(tmp_path / "missing", read_only=True).last_state() is None


def test_a_read_only_look_at_a_live_spool_skips_a_segment_its_owner_deleted_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader beside the running agent (its status, the benchmark) lists the segments, and the
    agent deletes one it has delivered before the reader reads it: what is left is still read."""
    spool = Spool(tmp_path, segment_bytes=300)  # a few frames per segment
    frames = fill(spool, 10)
    first = min(tmp_path.glob("seg-*.kvs"))
    read_bytes = Path.read_bytes

    def delivered_meanwhile(path: Path) -> bytes:
        if path == first:  # delivered and deleted between the listing and the read
            for frame in frames:
                if frame.segment == frames[0].segment:
                    spool.ack(frame)
            assert not first.exists()
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", delivered_meanwhile)
    ro = Spool(tmp_path, read_only=True)
    spool.close()
    assert [f.seq for f in ro.pending()] == [f.seq for f in frames if f.segment != frames[0].segment]
    assert ro.last_state() == {"seq": 10}


WRITER = textwrap.dedent(
    """
    import sys
    from kvmeter.agent.spool import Spool
    spool = Spool(sys.argv[1], segment_bytes=4096)
    start = len(spool.pending()) + 1
    seq = start
    while True:
        spool.append("s", seq, b"x" * (seq % 700), {"seq": seq}, seq)
        seq += 1
    """
)


def test_kill_9_at_any_instant_leaves_a_consistent_spool(tmp_path: Path) -> None:
    for round_ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)])
        time.sleep(0.3 + 0.07 * round_)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        spool = Spool(tmp_path, segment_bytes=4096)
        seqs = [f.seq for f in spool.pending()]
        assert seqs, "the writer should have spooled something"
        assert seqs == list(range(1, len(seqs) + 1))  # no gap, no duplicate, nothing torn kept
        assert spool.last_state() == {"seq": seqs[-1]}
        assert spool.read_batch(spool.pending()[-1]) == b"x" * (seqs[-1] % 700)
        spool.close()


def test_bound_drops_are_counted_in_the_agent_metrics(tmp_path: Path) -> None:
    from kvmeter.agent.metrics import AgentMetrics
    from kvmeter.proto import SCHEMA_VERSION, pb

    metrics = AgentMetrics()
    spool = Spool(tmp_path, max_age_ms=1000, on_drop=metrics.spool_dropped)
    batch = pb.MeasureBatch(stream_id="s", seq=1)
    batch.measures.add(header=SCHEMA_VERSION, saddr=0, bytes=4242, start=0, end=1)
    first = spool.append("s", 1, batch.SerializeToString(), {}, NOW)
    spool.append("s", 2, b"not a batch", {}, NOW + 5000)
    spool.append("s", 3, b"", {}, NOW + 10_000)
    spool.close()
    sample = metrics.registry.get_sample_value
    assert sample("kvmeter_agent_dropped_measured_bytes_total") == 4242
    assert sample("kvmeter_agent_spool_dropped_bytes_total") == spool.dropped_bytes > first.size
    assert spool.dropped_frames == 2


def test_a_polls_batches_are_written_together_with_the_state_last(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    fill(spool, 1)
    frames = spool.append_poll("s1", 2, [b"a" * 50, b"b" * 50, b"c" * 50], {"seq": 4}, NOW + 2)
    assert [f.seq for f in frames] == [2, 3, 4]
    spool.close()
    again = Spool(tmp_path)
    assert [f.seq for f in again.pending()] == [1, 2, 3, 4]
    assert [again.read_batch(f) for f in again.pending()[1:]] == [b"a" * 50, b"b" * 50, b"c" * 50]
    assert again.last_state() == {"seq": 4}


@pytest.mark.parametrize("cut", [1, 60])  # inside the last frame (the one with the state)
def test_a_poll_cut_short_is_dropped_whole(
    tmp_path: Path, cut: int, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path)
    fill(spool, 1)
    spool.append_poll("s1", 2, [b"a" * 50, b"b" * 50, b"c" * 50], {"seq": 4}, NOW + 2)
    spool.close()
    (segment,) = tmp_path.glob("seg-*.kvs")
    with open(segment, "r+b") as f:
        f.truncate(segment.stat().st_size - cut)
    with caplog.at_level(logging.WARNING):
        again = Spool(tmp_path)
    # Frames 2 and 3 are whole, but without frame 4 the poll's counter state is gone: the next
    # run measures that poll again, so its first batches must not be published.
    assert [f.seq for f in again.pending()] == [1]
    assert again.last_state() == {"seq": 1}
    assert "interrupted poll (stream s1 seq 2..3)" in caplog.text
    fill(again, 1, start=2)
    again.close()
    assert [f.seq for f in Spool(tmp_path).pending()] == [1, 2]


def test_backlog_counts_and_the_unproduced_tail_follow_appends_acks_drops_and_reopen(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000, segment_bytes=4096)
    frames = [spool.append("s", i, bytes([i]) * 300, {"n": i}, 1000 + i) for i in range(1, 41)]
    # the size bound dropped the oldest; the kept ones are the newest, in order
    kept = spool.pending()
    assert kept == frames[-len(kept) :]
    assert spool.dropped_frames == 40 - len(kept)
    assert (spool.pending_count(), spool.pending_bytes()) == (len(kept), sum(f.size for f in kept))
    assert spool.pending_from(kept[-3].position) == kept[-3:]
    assert spool.pending_from((0, 0)) == kept
    assert spool.pending_from((10**9, 0)) == []
    spool.ack(kept[1])  # not a prefix: nothing leaves
    spool.ack(kept[0])
    assert spool.pending() == kept[2:]
    assert spool.pending_bytes() == sum(f.size for f in kept[2:])
    # the batch just written comes from memory, the same bytes the file holds
    assert spool.read_batch(frames[-1]) == bytes([40]) * 300
    spool.close()
    again = Spool(tmp_path, read_only=True)
    assert again.pending() == kept[2:]
    assert again.read_batch(frames[-1]) == bytes([40]) * 300
    assert (again.pending_count(), again.pending_bytes()) == (len(kept) - 2, sum(f.size for f in kept[2:]))


@pytest.mark.parametrize("size", [0, 1, 255, 256, 65535, 65536, 300_000])
def test_frames_are_written_byte_for_byte_as_a_packed_payload_behind_its_length_and_crc(
    tmp_path: Path, size: int
) -> None:
    """The frames go out as pieces (no joined copy of the batch): the file must hold exactly
    HEADER + msgpack.packb([stream, seq, batch, state or None, written]) per frame."""
    import zlib

    import msgpack

    from kvmeter.agent.spool_frames import HEADER

    state = {"v": 1, "engine": {"counters": [[3, "vnet0", 2**63, 1, 0, 7, NOW, -5]], "name": "é"}}
    batches = [bytes(range(256)) * (size // 256) + b"z" * (size % 256), b"", b"q" * 70_000]
    spool = Spool(tmp_path)
    spool.append_poll("stream-é", 2**40, batches, state, NOW)
    spool.append_poll("stream-é", 2**40 + 3, batches[:1], {"seq": 4}, NOW + 1)
    spool.close()
    expected = b""
    for seq, batch, saved, written in [
        (2**40, batches[0], None, NOW),
        (2**40 + 1, batches[1], None, NOW),
        (2**40 + 2, batches[2], state, NOW),
        (2**40 + 3, batches[0], {"seq": 4}, NOW + 1),
    ]:
        payload = msgpack.packb(["stream-é", seq, batch, saved, written], use_bin_type=True)
        expected += HEADER.pack(len(payload), zlib.crc32(payload)) + payload
    (segment,) = tmp_path.glob("seg-*.kvs")
    assert segment.read_bytes() == expected
    again = Spool(tmp_path)
    assert [again.read_batch(f) for f in again.pending()] == [*batches, batches[0]]
    assert again.last_state() == {"seq": 4}


def test_a_short_write_goes_on_where_it_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.writev

    def short(fd: int, buffers: list[memoryview]) -> int:  # the kernel may write less than asked
        return real(fd, [bytes(b"".join(buffers)[:7])])

    monkeypatch.setattr(os, "writev", short)
    spool = Spool(tmp_path)
    spool.append_poll("s1", 1, [b"a" * 50, b"b" * 30], {"seq": 2}, NOW)
    spool.close()
    monkeypatch.undo()
    again = Spool(tmp_path)
    assert [again.read_batch(f) for f in again.pending()] == [b"a" * 50, b"b" * 30]
    assert again.last_state() == {"seq": 2}


def test_the_ack_record_is_overwritten_whole_and_read_back(tmp_path: Path) -> None:
    import msgpack

    (tmp_path / "ack.msgpack").write_bytes(msgpack.packb({"segment": 1, "offset": 0}) + b"older, longer")
    spool = Spool(tmp_path, segment_bytes=300)
    frames = fill(spool, 12)
    for frame in frames[:7]:
        spool.ack(frame)
        position = msgpack.unpackb((tmp_path / "ack.msgpack").read_bytes())
        assert (position["segment"], position["offset"]) == spool.pending()[0].position
    assert (tmp_path / "ack.msgpack").stat().st_size == 34
    spool.close()
    assert [f.seq for f in Spool(tmp_path).pending()] == list(range(8, 13))


def test_an_ack_file_removed_while_running_is_written_again(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    frames = fill(spool, 3)
    spool.ack(frames[0])
    (tmp_path / "ack.msgpack").unlink()
    spool.ack(frames[1])
    spool.close()
    assert [f.seq for f in Spool(tmp_path).pending()] == [3]
