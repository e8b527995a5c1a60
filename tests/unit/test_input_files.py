"""The files input: a followed events file gives whole lines once; a file read once (ingest)
gives its last line too; long backlogs come in chunks, each one delivery."""

from __future__ import annotations

from pathlib import Path

from kvmeter.collector.input_files import EventsFile
from kvmeter.collector.inputs import LIFECYCLE


def test_events_file_reads_whole_lines_once(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    feed = EventsFile(path)
    assert feed.read_new() == []  # not there yet
    path.write_bytes(b'{"a": 1}\n\n{"b": 2}\n{"c"')
    first = feed.read_new()
    assert [r.value for r in first] == [b'{"a": 1}', b'{"b": 2}']
    assert first[1].origin == f"{path}:3"
    with open(path, "ab") as f:
        f.write(b": 3}\n")
    assert [r.value for r in feed.read_new()] == [b'{"c": 3}']
    assert feed.read_new() == []
    path.write_bytes(b'{"new": 1}\n')  # replaced by a shorter file: start over
    assert [r.value for r in feed.read_new()] == [b'{"new": 1}']


def test_a_file_read_once_gives_its_last_line_without_newline(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": 2}')
    once = EventsFile(path, label="events.jsonl", follow=False)
    assert [(r.value, r.origin) for r in once.read_new()] == [
        (b'{"a": 1}', "events.jsonl:1"),
        (b'{"b": 2}', "events.jsonl:2"),
    ]
    assert once.caught_up()


def test_a_long_backlog_comes_in_chunks_and_reports_its_end(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"".join(b'{"n": %d}\n' % i for i in range(25)))
    feed = EventsFile(path, chunk=4)
    feed.start()
    deliveries = feed.poll(0)
    assert [len(d.records) for d in deliveries] == [4] * 6 + [1]
    assert {d.kind for d in deliveries} == {LIFECYCLE}
    assert feed.caught_up()
    assert feed.status()["events_file_lines"] == 25
    assert feed.poll(0) == []


def test_a_poll_reads_at_most_its_share_of_a_backlog(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"".join(b'{"n": %d}\n' % i for i in range(50)))
    feed = EventsFile(path, chunk=1)  # 20 chunks per poll
    assert sum(len(d.records) for d in feed.poll(0)) == 20
    assert not feed.caught_up()
    assert sum(len(d.records) for d in feed.poll(0)) == 20
    assert sum(len(d.records) for d in feed.poll(0)) == 10
    assert feed.caught_up()
