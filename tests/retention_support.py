"""A cloud's month for retention tests: closed and open histories, parked, quarantined and
dead-lettered input, old and live streams, fed through the collector at moving clock times."""

from __future__ import annotations

import json
from dataclasses import dataclass

import sqlalchemy as sa

from kvmeter.collector.model import Record, Settings
from kvmeter.collector.reconcile import Correction
from kvmeter.collector.retention import DAY_MS, RetentionPolicy
from kvmeter.collector.schema import handoff_outbox, lifecycle_events
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store, reconciliation
from tests.collector_support import (
    ACCT_A,
    ACCT_B,
    HOUR,
    IP1,
    MIN,
    T0,
    VM1,
    VM2,
    VM3,
    Clock,
    M,
    Stream,
    cs_time,
    usage_event,
)

VM5 = "9b1f0000-0000-4000-8000-000000000vm5"  # state events only: no owner, its measures park
VM6 = "9b1f0000-0000-4000-8000-000000000vm6"  # destroyed half an hour ago: its window is not final
VM7 = "9b1f0000-0000-4000-8000-000000000vm7"  # measured now, never known
NOW = T0 + 30 * 24 * HOUR
SETTINGS = Settings(grace_ms=2 * HOUR, park_horizon_ms=24 * HOUR)
# Events age shorter than the grace: the non-final guard, not the age, must keep VM6's events.
POLICY = RetentionPolicy(
    lifecycle_events_ms=10 * MIN,
    parked_measures_ms=DAY_MS,
    quarantined_measures_ms=DAY_MS,
    dead_letters_resolved_ms=DAY_MS,
    dead_letters_open_ms=None,
    stream_marks_ms=DAY_MS,
    corrections_ms=DAY_MS,
    domain_witness_ms=DAY_MS,
    outbox_sent_ms=DAY_MS,
    usage_ms=None,
)


def state_event(resource: str, old: str, new: str, at_ms: int) -> tuple[bytes, bytes]:
    doc = {
        "resource": "VirtualMachine",
        "id": resource,
        "old-state": old,
        "new-state": new,
        "eventDateTime": cs_time(at_ms),
    }
    return resource.encode(), json.dumps(doc, separators=(",", ":")).encode()


@dataclass
class Step:
    at_ms: int
    events: list[tuple[bytes | None, bytes]]
    batches: list[bytes]


def month(t0: int = T0) -> list[Step]:
    """The inputs, each step applied at its clock time and followed by a tick; t0 an hour
    boundary, the month ending at t0 + 30 days (NOW for the default)."""
    now = t0 + 30 * 24 * HOUR
    h1, h2, h3, h4 = (
        Stream("stream-h1", "h1"),
        Stream("stream-h2", "h2"),
        Stream("stream-h3", "h3"),
        Stream("stream-h4", "h4"),
    )
    return [
        Step(
            t0 + 3 * HOUR,
            [
                usage_event("VM.CREATE", VM1, ACCT_A, t0 - HOUR),
                usage_event("VM.START", VM1, ACCT_A, t0 + 30 * MIN),
                usage_event("VM.STOP", VM1, ACCT_A, t0 + 90 * MIN),
                usage_event("VM.DESTROY", VM1, ACCT_A, t0 + 2 * HOUR),
                usage_event("NET.IPASSIGN", IP1, ACCT_A, t0 + 15 * MIN),
                usage_event("NET.IPRELEASE", IP1, ACCT_A, t0 + 2 * HOUR),
                usage_event("VM.CREATE", VM2, ACCT_B, t0),
                usage_event("VM.START", VM2, ACCT_B, t0),
                state_event(VM5, "Stopped", "Running", t0),
                state_event(VM5, "Running", "Stopped", t0 + HOUR),
                (None, b'{"event": "VM.START"}'),  # poison: an open dead letter
            ],
            [
                h1.batch(
                    [
                        M(t0 + 10 * MIN, t0 + 20 * MIN, 1200),
                        M(t0 + 2 * MIN, t0 + 3 * MIN, 5000, quarantined=True),
                    ]
                ),
                _skip(h1).batch([M(t0 + 25 * MIN, t0 + 26 * MIN, 10)]),  # batch 2 never arrives: a gap
                h2.batch(
                    [
                        M(
                            t0 + 20 * MIN,
                            t0 + 21 * MIN,
                            777,
                            instance=VM3,
                            domain="i-4-12-VM",
                            mac="02:00:3a:7b:00:33",
                            address="198.51.100.33",
                        )
                    ]
                ),
                h2.batch(
                    [
                        M(
                            t0 + 2 * HOUR,
                            t0 + 2 * HOUR + MIN,
                            3000,
                            instance=VM2,
                            domain="i-3-11-VM",
                            mac="02:00:3a:7b:00:22",
                            address="203.0.113.22",
                        )
                    ]
                ),
            ],
        ),
        Step(t0 + 2 * 24 * HOUR, [], []),  # VM3's bytes reported as unattributed
        Step(
            now - 20 * MIN,
            [
                usage_event("VM.CREATE", VM6, ACCT_B, now - 5 * HOUR),
                usage_event("VM.DESTROY", VM6, ACCT_B, now - 30 * MIN),
            ],
            [
                h4.batch(
                    [
                        M(
                            now - 40 * MIN,
                            now - 39 * MIN,
                            55,
                            instance=VM5,
                            domain="i-5-15-VM",
                            mac="02:00:3a:7b:00:55",
                            address="198.51.100.55",
                        )
                    ]
                )
            ],
        ),
        Step(
            now,
            [],
            [
                h3.batch(
                    [
                        M(
                            now - 2 * MIN,
                            now - MIN,
                            900,
                            instance=VM2,
                            domain="i-3-11-VM",
                            mac="02:00:3a:7b:00:22",
                            address="203.0.113.22",
                        ),
                        M(
                            now - 2 * MIN,
                            now - MIN,
                            70,
                            instance=VM7,
                            domain="i-7-17-VM",
                            mac="02:00:3a:7b:00:77",
                            address="198.51.100.77",
                        ),
                    ]
                )
            ],
        ),
    ]


def _skip(stream: Stream) -> Stream:
    stream.seq += 1
    return stream


def feed(store: Store, clock: Clock, steps: list[Step]) -> Collector:
    collector = Collector(store, SETTINGS, clock)
    for step in steps:
        clock.now = step.at_ms
        collector.apply_events([Record(v, k, f"l@{i}") for i, (k, v) in enumerate(step.events)])
        collector.apply_batches([Record(b, None, f"m@{i}") for i, b in enumerate(step.batches)])
        collector.tick()
    return collector


def row_counts(store: Store) -> dict[str, int]:
    names = (
        "lifecycle_events", "parked_measures", "quarantined_measures", "dead_letters", "stream_marks",
        "stream_gaps", "usage_records", "usage_adjustments", "unbilled_bytes", "corrections",
        "domain_witness", "handoff_outbox",
    )  # fmt: skip
    with store.read() as conn:
        return {n: int(conn.execute(sa.text(f"SELECT count(*) FROM {n}")).scalar() or 0) for n in names}


def event_resources(store: Store) -> set[str]:
    with store.read() as conn:
        return {r[0] for r in conn.execute(sa.text("SELECT DISTINCT resource_uuid FROM lifecycle_events"))}


def add_outbox(store: Store) -> None:
    """Hand-off items: confirmed by every sink a month ago, an hour ago, and one still pending."""
    rows = [("tx-old-sent", T0 + 3 * HOUR), ("tx-new-sent", NOW - HOUR), ("tx-pending", None)]
    with store.write() as conn:
        conn.execute(
            sa.insert(handoff_outbox),
            [
                {"transaction_id": tx, "account": ACCT_A, "item": "{}", "created_ms": T0, "sent_ms": sent}
                for tx, sent in rows
            ],
        )


def outbox_ids(store: Store) -> set[str]:
    with store.read() as conn:
        return {r[0] for r in conn.execute(sa.select(handoff_outbox.c.transaction_id))}


def stored_event_id(store: Store, resource: str) -> str:
    with store.read() as conn:
        ev = lifecycle_events.c
        return str(conn.execute(sa.select(ev.event_id).where(ev.resource_uuid == resource).limit(1)).scalar())


def correct_a_pruned_and_a_kept_event(store: Store) -> None:
    """The reconciler's rows: one correction of VM1's stored event (a month's pass prunes VM1's
    events), one of VM2's (kept)."""
    with store.write() as conn:
        corrected = [(stored_event_id(store, VM1), VM1), (stored_event_id(store, VM2), VM2)]
        reconciliation.save_corrections(
            conn,
            [
                Correction(r, "VirtualMachine", "VM.STOP", T0, ACCT_A, "test", details=())
                for _, r in corrected
            ],
            T0,
        )
        conn.execute(
            sa.text("UPDATE corrections SET event_id = :e WHERE resource = :r"),
            [{"e": e, "r": r} for e, r in corrected],
        )
