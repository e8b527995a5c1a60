"""The spool when the disk fails it: a write or fsync that fails leaves nothing behind it (the
poll is undone and measured again under the same sequence numbers), also when cutting it off
must wait for the next append; a poll on disk is never undone for what the bound's clean-up
hits; a segment that cannot be opened does not wedge later appends. Through the spool alone,
and through the agent with a broker that keeps the first batch of each (stream, seq)."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from kvmeter.agent.spool import Spool
from kvmeter.proto import pb
from tests.unit.test_agent_daemon import Clock, Host, make_agent, vm_totals

NOW = 1_700_000_000_000


def _fsync_fails_once(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    real = os.fsync
    calls = []

    def fsync(fd: int) -> None:
        if not calls:
            calls.append(fd)
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def _open_fails_once(monkeypatch: pytest.MonkeyPatch, mode: str, err: int) -> list[Any]:
    """The spool's first open() in `mode` fails with `err`; returns the paths refused."""
    import kvmeter.agent.spool as spool_module

    real_open = open
    failed: list[Any] = []

    def failing_open(path: Any, how: str = "r", *args: Any, **kwargs: Any) -> Any:
        if how == mode and not failed:
            failed.append(path)
            raise OSError(err, os.strerror(err))
        return real_open(path, how, *args, **kwargs)

    monkeypatch.setattr(spool_module, "open", failing_open, raising=False)
    return failed


def test_a_poll_whose_fsync_fails_is_cut_off_the_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """append_poll raises (fsync EIO) after os.writev wrote the frames: the caller undoes the poll
    and writes it again under the same (stream, seq); the failed frames are cut off, so what is
    read back from disk is the retried batch."""
    spool = Spool(tmp_path)
    spool.append("s", 1, b"A" * 50, {"n": 1}, NOW)
    calls = _fsync_fails_once(monkeypatch)
    with pytest.raises(OSError):
        spool.append("s", 2, b"FAILED" * 10, {"n": "failed"}, NOW + 1)
    assert calls
    retried = spool.append("s", 2, b"RETRY" * 10, {"n": 2}, NOW + 2)
    assert spool.read_batch(retried) == b"RETRY" * 10  # (served from memory)
    spool._just_written.clear()
    assert spool.read_batch(retried) == b"RETRY" * 10  # from disk
    spool.close()


def test_spool_reopen_after_fsync_failure_has_each_seq_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)
    spool.append("s", 1, b"A" * 50, {"n": 1}, NOW)
    _fsync_fails_once(monkeypatch)
    with pytest.raises(OSError):
        spool.append("s", 2, b"FAILED" * 10, {"n": "failed"}, NOW + 1)
    spool.append("s", 2, b"RETRY" * 10, {"n": 2}, NOW + 2)
    spool.close()
    again = Spool(tmp_path)
    assert [(f.stream_id, f.seq) for f in again.pending()] == [("s", 1), ("s", 2)]
    assert [again.read_batch(f) for f in again.pending()] == [b"A" * 50, b"RETRY" * 10]


def test_spool_partial_write_then_good_polls_survive_reopen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC in the middle of a poll's write (writev wrote part, then failed): the disk gets space
    back and the next polls are spooled and fsynced. Reopening keeps them and their state (a torn
    frame left before them would cut them off)."""
    spool = Spool(tmp_path)
    spool.append("s", 1, b"A" * 50, {"n": 1}, NOW)
    real = os.writev
    state = {"failed": False}

    def writev(fd: int, views: Any) -> int:
        if not state["failed"]:
            state["failed"] = True
            return real(fd, [bytes(views[0])[:7]])  # a short write ...
        if state["failed"] == "again":
            return real(fd, views)
        state["failed"] = "again"
        raise OSError(errno.ENOSPC, "No space left on device")  # ... then the disk is full

    monkeypatch.setattr(os, "writev", writev)
    with pytest.raises(OSError):
        spool.append("s", 2, b"B" * 50, {"n": "failed"}, NOW + 1)
    spool.append("s", 2, b"C" * 50, {"n": 2}, NOW + 2)
    spool.append("s", 3, b"D" * 50, {"n": 3}, NOW + 3)
    spool.close()
    again = Spool(tmp_path)
    assert [f.seq for f in again.pending()] == [1, 2, 3]
    assert again.last_state() == {"n": 3}


def test_agent_poll_whose_fsync_fails_counts_every_byte_once(
    host: Host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's own promise (a poll that cannot spool is undone), with the failure where
    the disk gives it: fsync. The collector keeps the first batch it sees of each (stream, seq),
    as vm_totals does."""
    clock = Clock()
    agent = make_agent(host, tmp_path, clock)
    agent.poll_once()
    host.traffic("vnet0", 10, 20)
    clock.t += 1
    _fsync_fails_once(monkeypatch)
    with pytest.raises(OSError):
        agent.poll_once()
    host.traffic("vnet0", 1000, 2000)
    clock.t += 1
    agent.poll_once()
    agent.close()
    assert vm_totals(tmp_path) == {pb.VM_RX: 2020, pb.VM_TX: 1010}


class Broker:
    """What the collector keeps: the first batch of each (stream, seq)."""

    def __init__(self) -> None:
        self.kept: dict[tuple[str, int], bytes] = {}

    def factory(self, config: dict[str, Any]) -> Any:
        broker = self

        class Producer:
            def __init__(self) -> None:
                self.queue: list[Any] = []

            def produce(self, topic: str, value: bytes, key: bytes, on_delivery: Any) -> None:
                self.queue.append((value, on_delivery))

            def poll(self, timeout: float) -> int:
                queue, self.queue = self.queue, []
                for value, callback in queue:
                    b = pb.MeasureBatch.FromString(value)
                    broker.kept.setdefault((b.stream_id, b.seq), value)
                    callback(None, None)
                return len(queue)

            def purge(self) -> None:
                self.queue = []

        return Producer()

    def totals(self) -> dict[int, int]:
        totals = {pb.VM_RX: 0, pb.VM_TX: 0}
        for value in self.kept.values():
            for m in pb.MeasureBatch.FromString(value).measures:
                totals[m.direction] += m.bytes
        return totals


def _agent_with_broker(host: Host, spool_dir: Path, clock: Clock, broker: Broker) -> Any:
    from kvmeter.agent.publish import Publisher

    spool = Spool(spool_dir)
    publisher = Publisher(spool, bootstrap="b:1", topic="t", key="h1", producer_factory=broker.factory)
    return make_agent(host, spool_dir, clock, spool=spool, publisher=publisher)


def test_agent_restart_after_a_partially_written_poll_counts_every_byte_once(
    host: Host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A poll's writev writes part of its frame then hits ENOSPC; the next poll is spooled,
    published and acknowledged; the agent restarts (kill -9). The broker must hold every byte
    once."""
    clock = Clock()
    broker = Broker()
    agent = _agent_with_broker(host, tmp_path, clock, broker)
    agent.poll_once()
    host.traffic("vnet0", 10, 20)
    clock.t += 1
    real = os.writev
    state = {"n": 0}

    def writev(fd: int, views: Any) -> int:
        state["n"] += 1
        if state["n"] == 1:
            return real(fd, [bytes(views[0])[:20]])
        if state["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, views)

    monkeypatch.setattr(os, "writev", writev)
    with pytest.raises(OSError):
        agent.poll_once()
    host.traffic("vnet0", 1000, 2000)
    clock.t += 1
    agent.poll_once()
    assert agent.publisher.flush(1.0)
    monkeypatch.setattr(os, "writev", real)
    # kill -9, a new incarnation
    second = _agent_with_broker(host, tmp_path, clock, broker)
    assert second.resumed
    host.traffic("vnet0", 3, 4)
    clock.t += 1
    second.poll_once()
    assert second.publisher.flush(1.0)
    second.close()
    agent.spool.close()
    assert broker.totals() == {pb.VM_RX: 2024, pb.VM_TX: 1013}


@pytest.fixture
def host() -> Host:
    h = Host()
    h.traffic("vnet0", 5000, 7000)
    return h


def test_agent_poll_spooled_then_failing_at_the_bound_is_not_undone(
    host: Host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The age bound drops the oldest frame after the poll's frames were written and fsynced;
    reading that frame back (for on_drop) hits EIO. The poll is on disk and pending: it is not
    undone (and spooled again under the same seq numbers)."""

    dropped: list[bytes] = []
    spool = Spool(tmp_path, max_age_ms=1500, on_drop=lambda frame, batch: dropped.append(batch))
    clock = Clock()
    agent = make_agent(host, tmp_path, clock, spool=spool)  # no publisher: the broker is away
    agent.poll_once()
    host.traffic("vnet0", 10, 20)
    clock.t += 1
    agent.poll_once()
    host.traffic("vnet0", 100, 200)
    clock.t += 1

    failed = _open_fails_once(monkeypatch, "rb", errno.EIO)
    agent.poll_once()  # the bound's read of the oldest frame (seq 1, the baseline) fails
    assert failed
    host.traffic("vnet0", 1000, 2000)
    clock.t += 1
    agent.poll_once()
    agent.close()
    again = Spool(tmp_path, read_only=True)
    kept: dict[tuple[str, int], bytes] = {}
    for frame in again.pending():
        kept.setdefault((frame.stream_id, frame.seq), again.read_batch(frame))
    for batch in dropped:
        if not batch:
            continue  # unreadable (the baseline poll: no bytes)
        b = pb.MeasureBatch.FromString(batch)
        kept.setdefault((b.stream_id, b.seq), batch)
    totals = {pb.VM_RX: 0, pb.VM_TX: 0}
    for batch in kept.values():
        for m in pb.MeasureBatch.FromString(batch).measures:
            totals[m.direction] += m.bytes
    # every byte once, between what is spooled and what the bound dropped (and counted as lost)
    assert totals == {pb.VM_RX: 2220, pb.VM_TX: 1110}
    seqs = [f.seq for f in again.pending()]
    assert len(seqs) == len(set(seqs)), f"a seq spooled twice: {seqs}"


def test_spool_a_failed_segment_open_does_not_wedge_every_later_append(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening the next segment fails once (EMFILE, ENOSPC creating the file): the old segment's
    file is closed and no longer the active one, and the next append opens the new segment."""

    spool = Spool(tmp_path, segment_bytes=100)
    spool.append("s", 1, b"A" * 200, {"n": 1}, NOW)  # fills segment 1
    failed = _open_fails_once(monkeypatch, "ab", errno.EMFILE)
    with pytest.raises(OSError):
        spool.append("s", 2, b"B" * 20, {"n": 2}, NOW + 1)
    assert failed
    spool.append("s", 2, b"B" * 20, {"n": 2}, NOW + 2)  # the condition is gone
    spool.close()
    assert [f.seq for f in Spool(tmp_path).pending()] == [1, 2]


def test_spool_a_failed_write_that_cannot_be_cut_off_at_once_is_cut_before_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like test_spool_reopen_after_fsync_failure_has_each_seq_once, with the cutting back failing
    once too: the next append cuts first, nothing is written behind the failed poll's bytes."""
    spool = Spool(tmp_path)
    spool.append("s", 1, b"A" * 50, {"n": 1}, NOW)
    _fsync_fails_once(monkeypatch)
    real_ftruncate = os.ftruncate
    truncations = []

    def ftruncate(fd: int, size: int) -> None:
        truncations.append(size)
        if len(truncations) == 1:
            raise OSError(errno.EIO, "Input/output error")
        real_ftruncate(fd, size)

    monkeypatch.setattr(os, "ftruncate", ftruncate)
    with pytest.raises(OSError):
        spool.append("s", 2, b"FAILED" * 10, {"n": "failed"}, NOW + 1)
    spool.append("s", 2, b"RETRY" * 10, {"n": 2}, NOW + 2)
    spool.close()
    again = Spool(tmp_path)
    assert [again.read_batch(f) for f in again.pending()] == [b"A" * 50, b"RETRY" * 10]
    assert again.last_state() == {"n": 2}
