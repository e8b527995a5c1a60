"""Batch ingest: event JSON lines and measure files (length-delimited protobuf or the agent's
JSON) through the live code path, in-process and through the `kvmeter` command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import json_format

from kvmeter.collector.ingest import ingest
from kvmeter.collector.model import Settings
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store
from kvmeter.proto import pb
from tests.collector_support import (
    ACCT_B,
    HOUR,
    MIN,
    T0,
    VM1,
    VM2,
    VM3,
    Clock,
    delimited,
    expected_usage,
    net_by_short_key,
    scenario,
    usage_event,
)

NOW = T0 + 5 * HOUR


def write_inputs(tmp_path: Path, *, json_measures: bool = False, bad: bool = True) -> tuple[Path, Path]:
    sc = scenario()
    lines = [value for _, value in sc.events]
    if bad:
        lines += [b'{"eventDateTime": "2024-05-14 09:00:00 +0000", "no": "category"}', b"{truncated"]
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join(lines) + b"\n\n")
    batches = [*sc.batches, sc.batches[0]]  # a redelivered batch
    measures = tmp_path / ("measures.json" if json_measures else "measures.pb")
    if json_measures:
        docs = [json_format.MessageToDict(pb.MeasureBatch.FromString(b)) for b in batches]
        measures.write_text("\n".join(json.dumps(d, indent=1) for d in docs) + "\n")
    else:
        measures.write_bytes(delimited(batches) + (b"\x80\x01partial" if bad else b""))
    return events, measures


@pytest.mark.parametrize("json_measures", [False, True], ids=["delimited-protobuf", "agent-json"])
def test_ingest_gives_the_expected_records(tmp_path: Path, json_measures: bool) -> None:
    events, measures = write_inputs(tmp_path, json_measures=json_measures)
    store = Store(f"sqlite:///{tmp_path}/usage.db")
    store.migrate()
    out = ingest(Collector(store, Settings(), Clock(NOW)), [events], [measures])

    assert net_by_short_key(store.net_usage()) == expected_usage(NOW)
    assert (out.batches, out.duplicates) == (4, 1)
    assert [m.bytes for m in store.parked_rows()] == [777]  # VM3: no lifecycle, never guessed
    assert [m.bytes for m in store.quarantined_rows()] == [5000]
    unbilled = store.unbilled()  # guest traffic: metered, not billable, still accounted for
    assert [(k.detail, k.resource, v) for k, v in unbilled.items()] == [("guest", VM1, 999)]
    # Conservation: every byte of every (non-duplicate) batch is billed, unbilled, parked or quarantined.
    billed = sum(v for k, v in store.net_usage().items() if k.usage_type in (4, 5))
    metered = sum(m.bytes for b in scenario().batches for m in pb.MeasureBatch.FromString(b).measures)
    assert billed + sum(unbilled.values()) + 777 + 5000 == metered
    letters = {(r["source"], r["reason"]) for r in store.dead_letter_rows()}
    expected_letters = {("lifecycle", "unknown_event"), ("lifecycle", "malformed_json")}
    if not json_measures:
        expected_letters.add(("measures", "truncated_record"))
    assert letters == expected_letters
    # Windows that ended more than the grace period (2 h) before now are final; the rest open.
    finals = {r.key.window_start_ms: r.final for r in store.usage(T0 - HOUR, NOW)}
    assert finals == {ws: ws + HOUR <= NOW - 2 * HOUR for ws in range(T0 - HOUR, NOW, HOUR)}
    store.close()


def test_ingesting_the_same_files_again_changes_nothing(tmp_path: Path) -> None:
    events, measures = write_inputs(tmp_path)
    store = Store(f"sqlite:///{tmp_path}/usage.db")
    store.migrate()
    ingest(Collector(store, Settings(), Clock(NOW)), [events], [measures])
    before = store.net_usage()
    letters = len(store.dead_letter_rows())
    again = ingest(Collector(store, Settings(), Clock(NOW)), [events], [measures])
    assert (again.batches, again.events, again.records, again.adjustments) == (0, 0, 0, 0)
    assert store.net_usage() == before
    assert len(store.dead_letter_rows()) == letters
    store.close()


def test_late_lifecycle_adjusts_final_windows_and_never_rewrites_them(tmp_path: Path) -> None:
    events, measures = write_inputs(tmp_path, bad=False)
    store = Store(f"sqlite:///{tmp_path}/usage.db")
    store.migrate()
    ingest(Collector(store, Settings(), Clock(NOW)), [events], [measures])
    recorded = {r.key: r.recorded for r in store.usage(0, 2**62) if r.final}

    late = tmp_path / "late.jsonl"  # VM2 really stopped at T0+90m; VM3's owner arrives
    late.write_bytes(
        usage_event("VM.STOP", VM2, ACCT_B, T0 + 90 * MIN)[1]
        + b"\n"
        + usage_event("VM.CREATE", VM3, ACCT_B, T0)[1]
        + b"\n"
    )
    out = ingest(Collector(store, Settings(), Clock(NOW)), [late], [])
    assert out.unparked == 1
    rows = {r.key: r for r in store.usage(0, 2**62)}
    # Final records keep their recorded quantity; the change is in adjustments.
    assert {k: r.recorded for k, r in rows.items() if k in recorded} == recorded
    running = {k.window_start_ms: r for k, r in rows.items() if k.resource == VM2 and k.usage_type == 1}
    assert running[T0 + HOUR].quantity == 30 * MIN
    assert running[T0 + HOUR].adjustment == -30 * MIN
    assert running[T0 + 2 * HOUR].quantity == 0  # final: kept at net zero via an adjustment
    assert T0 + 3 * HOUR not in running  # open windows simply lose the record
    vm3 = [r for k, r in rows.items() if k.resource == VM3 and k.usage_type == 4]
    assert [(r.key.account, r.recorded, r.adjustment, r.final) for r in vm3] == [(ACCT_B, 0, 777, True)]
    assert store.parked_rows() == []
    # What changed after finalization, as a billing system that already took those windows reads it.
    changes = store.adjustments(NOW)
    assert {(a.key.resource, a.key.usage_type, a.reason) for a in changes} == {
        (VM2, 1, "late lifecycle"),  # shorter running
        (VM3, 2, "late lifecycle"),  # allocated all along, learnt late
        (VM3, 4, "late attribution"),  # its parked bytes
    }
    assert sum(a.delta for a in changes if a.key.resource == VM2) == -(30 * MIN + HOUR)
    assert store.adjustments(NOW + 1) == []
    store.close()


def test_cli_ingest_and_usage_report(tmp_path: Path) -> None:
    events, measures = write_inputs(tmp_path, json_measures=True)
    db = f"sqlite:///{tmp_path}/cli.db"
    now = "2024-05-14T14:00:00Z"  # NOW
    run = [sys.executable, "-m", "kvmeter"]
    done = subprocess.run(
        [*run, "ingest", "--db", db, "--events", str(events), "--measures", str(measures), "--now", now],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "2 dead-lettered" in done.stderr
    report = subprocess.run(
        [*run, "usage", "--db", db, "--start", "2024-05-14", "--end", "2024-05-14", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rows = json.loads(report.stdout)
    got = {
        (r["account"], r["usage_type"], r["resource"], r["traffic_type"], r["start_ms"]): r["quantity"]
        for r in rows
    }
    assert got == expected_usage(NOW)
    cs = subprocess.run(
        [*run, "usage", "--db", db, "--start", "2024-05-14", "--end", "2024-05-14", "--type", "4",
         "--account", ACCT_B, "--format", "cloudstack"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    response = json.loads(cs.stdout)["listusagerecordsresponse"]
    assert response["count"] == 1
    (record,) = response["usagerecord"]
    assert (record["rawusage"], record["usage"], record["type"]) == ("3000", "3000 bytes sent", "UserVm")
    assert (record["startdate"], record["enddate"]) == (
        "2024-05-14T11:00:00+0000",
        "2024-05-14T11:59:59+0000",
    )
    table = subprocess.run(
        [*run, "usage", "--db", db, "--start", "2024-05-14", "--end", "2024-05-15", "--resource", VM2],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert table.stdout.strip().endswith("11 record(s)")  # VM2: 5 h running, 5 h allocated, 1 bytes
    assert "777 B parked" in table.stderr
    assert "5000 B quarantined" in table.stderr
    assert "999 B of non-billable traffic" in table.stderr


def test_cli_rejects_what_it_cannot_use(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "kvmeter"]
    db = f"sqlite:///{tmp_path}/x.db"
    nothing = subprocess.run(
        [*run, "ingest", "--db", db], capture_output=True, text=True, timeout=60, check=False
    )
    assert nothing.returncode == 2
    assert "nothing to ingest" in nothing.stderr
    events, _ = write_inputs(tmp_path)
    window = subprocess.run(
        [*run, "ingest", "--db", db, "--events", str(events), "--window-seconds", "7"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert window.returncode == 1
    assert "divisor of a day" in window.stderr
    when = subprocess.run(
        [*run, "usage", "--db", db, "--start", "yesterday", "--end", "2024-05-14"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert when.returncode == 2
    assert "not a time" in when.stderr


def test_a_corrupt_length_prefix_is_dead_lettered_not_read(tmp_path: Path) -> None:
    sc = scenario()
    measures = tmp_path / "m.pb"
    measures.write_bytes(delimited(sc.batches[:1]) + b"\xff\xff\xff\xff\xff\xff\xff\x7f" + b"junk")
    store = Store(f"sqlite:///{tmp_path}/usage.db")
    store.migrate()
    out = ingest(Collector(store, Settings(), Clock(NOW)), [], [measures])
    assert out.batches == 1
    assert [(d.origin, d.reason) for d in out.dead_letters] == [("m.pb#2", "truncated_record")]
    store.close()


def test_events_of_wrong_types_or_over_the_size_limit_are_dead_lettered_and_the_rest_billed(
    tmp_path: Path,
) -> None:
    """VM3's lifecycle arrives only in bad shapes, between the good events of one chunk: none of
    it is billed (no account "123", its bytes stay parked) and every good event still is."""
    sc = scenario()
    _, create = usage_event("VM.CREATE", VM3, ACCT_B, T0)
    _, start = usage_event("VM.START", VM3, ACCT_B, T0 + MIN)
    doc = json.loads(create)
    bad = {
        "wrong_type account": json.dumps({**doc, "account": 123}).encode(),
        "wrong_type resource": json.dumps(
            {**doc, "resource": {"class": "com.cloud.vm.VirtualMachine"}}
        ).encode(),
        "wrong_type id": json.dumps({**doc, "id": 12}).encode(),
        "oversized_event": json.dumps({**json.loads(start), "note": "x" * 3000}).encode(),
    }
    good = [value for _, value in sc.events]
    lines = [good[0], *bad.values(), *good[1:]]
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join(lines) + b"\n")
    measures = tmp_path / "measures.pb"
    measures.write_bytes(delimited(sc.batches))
    store = Store(f"sqlite:///{tmp_path}/usage.db")
    store.migrate()
    out = ingest(Collector(store, Settings(max_event_bytes=2048), Clock(NOW)), [events], [measures])

    assert (out.events, len(out.dead_letters)) == (len(good), len(bad))
    assert net_by_short_key(store.net_usage()) == expected_usage(NOW)
    assert "123" not in {k.account for k in store.net_usage()}
    assert [m.bytes for m in store.parked_rows()] == [777]  # VM3's bytes: still no known owner
    letters = [(r["source"], r["reason"], bytes(r["raw"]), r["message"]) for r in store.dead_letter_rows()]
    assert [(source, reason, raw) for source, reason, raw, _ in letters] == [
        ("lifecycle", label.split()[0], raw) for label, raw in bad.items()
    ]
    assert [message.split(" ")[0] for _, reason, _, message in letters if reason == "wrong_type"] == [
        "account", "resource", "id"
    ]  # fmt: skip
    store.close()
