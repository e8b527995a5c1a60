"""The events-file input (the all-in-one's [lifecycle] events_file) across rotations: a
copytruncate rotation keeps the lines not read yet, and the delivery order the clock-skew rule
reads goes on rising across rotations and restarts."""

from __future__ import annotations

import gzip
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import kvmeter.agent.cli
from kvmeter.collector.feed import Feeder
from kvmeter.collector.input_files import EventsFile
from kvmeter.collector.metrics import Metrics
from kvmeter.collector.model import RUNNING_VM, Settings
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store
from kvmeter.pipeline import allinone
from tests.collector_support import ACCT_A, HOUR, T0, VM1, Clock, usage_event


def _line(event: str, at: int) -> bytes:
    return usage_event(event, VM1, ACCT_A, at)[1] + b"\n"


def _copytruncate(path: Path, copy: Path) -> None:
    """What logrotate's copytruncate does: copy the file, then truncate it in place."""
    shutil.copyfile(path, copy)
    with open(path, "r+b") as f:
        f.truncate(0)


def test_copytruncate_rotation_reads_the_unread_lines_from_the_copy(
    tmp_path: Path,
) -> None:
    """A followed events file truncated in place after being copied (logrotate copytruncate):
    the lines written after the last poll and before the truncation are in the copy, and must be
    read from it (once), before the truncated file is read from its top. A sibling that does not
    begin with what was read (an older rotation, another file) is never taken for the copy."""
    path = tmp_path / "events.jsonl"
    decoy = tmp_path / "events.jsonl-20260101"  # newest by mtime, longer, another content
    path.write_bytes(b'{"a": 1}\n')
    feed = EventsFile(path)
    try:
        assert [r.value for r in feed.read_new()] == [b'{"a": 1}']
        with open(path, "ab") as f:
            f.write(b'{"b": 2}\n{"c": 3}\n')  # written before the rotation, not polled yet
        _copytruncate(path, tmp_path / "events.jsonl.1")
        decoy.write_bytes(b'{"x": 0}\n' * 10)
        with open(path, "ab") as f:
            f.write(b'{"d": 4}\n')
        got = [r.value for r in feed.read_new()]
        assert got == [b'{"b": 2}', b'{"c": 3}', b'{"d": 4}'], f"read {got!r}"
        assert feed.read_new() == []
        with open(path, "ab") as f:
            f.write(b'{"e": 5}\n')
        assert [r.value for r in feed.read_new()] == [b'{"e": 5}']
    finally:
        feed.close()


def test_copytruncate_rotation_without_a_readable_copy_is_logged_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A truncation in place whose copy cannot be read (compressed at once, no delaycompress)
    loses the unread lines: that must not pass silently — an error in the log, one more on the
    `events_file_truncations_unrecovered` count (/health) and the metric's callback — and the
    file is then read from its top."""
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"a": 1}\n')
    lost: list[int] = []
    feed = EventsFile(path, lost=lambda: lost.append(1))
    try:
        feed.read_new()
        with open(path, "ab") as f:
            f.write(b'{"b": 2}\n')
        (tmp_path / "events.jsonl.1.gz").write_bytes(gzip.compress(path.read_bytes()))
        path.write_bytes(b"")
        with open(path, "ab") as f:
            f.write(b'{"c": 3}\n')
        with caplog.at_level(logging.ERROR, logger="kvmeter.collector.input_files"):
            assert [r.value for r in feed.read_new()] == [b'{"c": 3}']
        assert feed.status()["events_file_truncations_unrecovered"] == 1
        assert lost == [1]
        assert any("truncated" in r.getMessage() for r in caplog.records)
    finally:
        feed.close()


def _running_billed(store: Store) -> int:
    return sum(r.quantity for r in store.usage(T0 - 24 * HOUR, T0 + 48 * HOUR, usage_type=RUNNING_VM))


def test_delivery_order_rises_across_a_rotation(tmp_path: Path) -> None:
    """The clock-skew rule: within one source an event delivered after another and stamped up to
    a minute earlier is applied after it. A VM.STOP written to the new file after a rotation,
    stamped 30 s before the VM.START that ended the old file (another management server's
    clock), is delivered after it: the VM ends stopped, no RUNNING time. The new file's lines
    must not be ordered before the old file's (its delivery order restarting at 1)."""
    store = Store(f"sqlite:///{tmp_path}/usage.db")
    store.migrate()
    path = tmp_path / "events.jsonl"
    path.write_bytes(_line("VM.CREATE", T0) + _line("VM.START", T0 + HOUR))
    collector = Collector(store, Settings(), Clock(T0 + 10 * HOUR))
    feeder = Feeder(collector, [EventsFile(path)], Metrics(), tick_seconds=3600, poll_timeout=0)
    try:
        feeder.step()
        os.rename(path, tmp_path / "events.jsonl.1")
        path.write_bytes(_line("VM.STOP", T0 + HOUR - 30_000))
        feeder.step()
        feeder.step()
        assert feeder.totals.events == 3
        assert _running_billed(store) == 0, "the STOP delivered last was applied before the START"
    finally:
        feeder.close()
        store.close()


def _all_in_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The all-in-one from TOML, its agent stubbed: the events file as it follows it."""
    monkeypatch.setattr(
        kvmeter.agent.cli,
        "build_agent",
        lambda *_a, **_k: SimpleNamespace(set_traffic_rules=lambda _r: None),
    )
    config = tmp_path / "allinone.toml"
    config.write_text(
        f'[store]\nurl = "sqlite:///{tmp_path}/usage.db"\n[api]\nenabled = false\n'
        f'[agent]\nstate_dir = "{tmp_path}/agent"\n[lifecycle]\nevents_file = "events.jsonl"\n'
    )
    return allinone.AllInOne(allinone.load(config), clock=Clock(T0 + 10 * HOUR))


def test_delivery_order_rises_across_a_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As across a rotation, across a restart of the all-in-one: the file rotated while it was
    down, the new file's VM.STOP (stamped 30 s before the VM.START the previous run read last)
    is delivered after it, so the VM ends stopped. The order must not restart at 1 with the
    process (what was given before is kept with the events in the store)."""
    path = tmp_path / "events.jsonl"
    path.write_bytes(_line("VM.CREATE", T0) + _line("VM.START", T0 + HOUR))
    first = _all_in_one(tmp_path, monkeypatch)
    try:
        first.feeder.start()
        first.idle()
        assert first.feeder.totals.events == 2
    finally:
        first.close()
    os.rename(path, tmp_path / "events.jsonl.1")
    path.write_bytes(_line("VM.STOP", T0 + HOUR - 30_000))
    second = _all_in_one(tmp_path, monkeypatch)
    try:
        second.feeder.start()
        second.idle()
        assert second.feeder.totals.events == 1
        assert _running_billed(second.store) == 0, "the STOP delivered last was applied before the START"
    finally:
        second.close()


def test_lines_of_a_file_rotated_while_stopped_are_read_at_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every start reads the events file from its top; a file rotated (renamed, logrotate's
    create) while the all-in-one was stopped holds the lines its writer appended after the last
    run's last read: they must be read at the next start (from `<name>.1`), not lost. Here the
    VM.STOP written before the rotation must end the VM's RUNNING time."""
    path = tmp_path / "events.jsonl"
    path.write_bytes(_line("VM.CREATE", T0) + _line("VM.START", T0 + HOUR))
    first = _all_in_one(tmp_path, monkeypatch)
    try:
        first.feeder.start()
        first.idle()
    finally:
        first.close()
    with open(path, "ab") as f:
        f.write(_line("VM.STOP", T0 + 2 * HOUR))  # while stopped, then rotated
    os.rename(path, tmp_path / "events.jsonl.1")
    path.write_bytes(_line("VM.START", T0 + 5 * HOUR))
    second = _all_in_one(tmp_path, monkeypatch)
    try:
        second.feeder.start()
        second.idle()
        assert second.feeder.totals.events == 2, "the VM.STOP in events.jsonl.1 was never read"
        assert _running_billed(second.store) == 6 * HOUR  # T0+1h..2h and T0+5h..10h
    finally:
        second.close()
