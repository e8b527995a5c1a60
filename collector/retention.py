"""Retention: how long each kind of stored data is kept, and which closed histories may go.

Pure: ages in, cutoffs and decisions out; the store's pruning (store/pruning.py) and the job
that runs it (prune.py) do the I/O. An age of None keeps that kind for good.

What is never pruned, whatever the ages (the rules the store's selections follow):
- lifecycle events of a resource whose history is still open, whose last segment ends after the
  finalized watermark, whose identities (uuid, MACs, addresses) a parked measure still carries,
  or of which any event is younger than the age; a resource's events go all together or not
  at all, leaving a tombstone (schema_retention.pruned_resources);
- parked measures not yet reported as unattributed (still waiting for an owner within the
  horizon): their bytes are counted nowhere else;
- usage records, adjustments and unbilled bytes of windows that are not final;
- open dead letters unless their own age is set; stream marks of a stream that sent a batch
  within the age; hand-off outbox rows not yet confirmed by every sink.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmeter.collector.model import ResourceHistory

DAY_MS = 86_400_000

# Kinds, in the order a pass prunes them: what references another kind goes first (parked
# measures keep a resource's events; a correction is kept while its event is).
KINDS = (
    "parked_measures",
    "quarantined_measures",
    "dead_letters_resolved",
    "dead_letters_open",
    "lifecycle_events",
    "corrections",
    "domain_witness",
    "stream_marks",
    "outbox_sent",
    "usage",
)
# Rows counted per kind in a pass's report: a kind may delete from several tables.
TABLES = {
    "parked_measures": ("parked_measures",),
    "quarantined_measures": ("quarantined_measures",),
    "dead_letters_resolved": ("dead_letters_resolved",),
    "dead_letters_open": ("dead_letters_open",),
    "lifecycle_events": ("lifecycle_events",),
    "corrections": ("corrections",),
    "domain_witness": ("domain_witness",),
    "stream_marks": ("stream_marks", "stream_gaps"),
    "outbox_sent": ("handoff_outbox",),
    "usage": ("usage_records", "usage_adjustments", "unbilled_bytes"),
}


@dataclass(frozen=True)
class RetentionPolicy:
    """Ages in ms per kind (None: kept for good) and how the job runs. The defaults, and why:

    - lifecycle events 400 days: a rebuild of the last year of invoices, plus a month of
      disputes, still has the raw events it needs;
    - parked measures 90 days after they were reported as unattributed (their bytes are in
      usage by then; only a very late owner could still have taken them over);
    - quarantined measures 400 days: the evidence behind bytes not billed, for the same year;
    - resolved dead letters 30 days (their record went through); open ones for good (they hold
      bytes nobody used yet: an operator decides);
    - stream marks 180 days without a batch: far longer than a measures topic keeps records or
      an agent spools them, so no batch of that stream can arrive again to be billed twice;
    - reconciliation corrections 400 days, like the events they explain (and never before their
      event is gone); the agents' witness of a domain not running 30 days;
    - hand-off outbox rows 30 days after every sink confirmed them (a billing system dedupes by
      transaction id; the records and adjustments themselves stay); pending ones never;
    - final usage records, adjustments and unbilled bytes for good: they are the bill.
    """

    lifecycle_events_ms: int | None = 400 * DAY_MS
    parked_measures_ms: int | None = 90 * DAY_MS
    quarantined_measures_ms: int | None = 400 * DAY_MS
    dead_letters_resolved_ms: int | None = 30 * DAY_MS
    dead_letters_open_ms: int | None = None
    stream_marks_ms: int | None = 180 * DAY_MS
    corrections_ms: int | None = 400 * DAY_MS
    domain_witness_ms: int | None = 30 * DAY_MS
    outbox_sent_ms: int | None = 30 * DAY_MS
    usage_ms: int | None = None
    enabled: bool = True  # the collector's periodic job (`kvmeter prune` runs regardless)
    interval_ms: int = 3_600_000
    batch_rows: int = 5000

    def age(self, kind: str) -> int | None:
        age: int | None = getattr(self, f"{kind}_ms")
        return age

    def cutoffs(self, now_ms: int) -> dict[str, int]:
        """{kind: rows older than this may go} for the kinds with an age."""
        return {kind: now_ms - age for kind in KINDS if (age := self.age(kind)) is not None}

    def problems(self) -> list[str]:
        """Final usage is kept longest: events and parked measures kept longer would outlive the
        records they explain (a late owner of a parked measure would move bytes into a pruned
        window)."""
        if self.usage_ms is None:
            return []
        return [
            f"retention.{kind}_days: longer than usage_days (final usage is kept longest)"
            for kind in ("lifecycle_events", "parked_measures")
            if (age := self.age(kind)) is None or age > self.usage_ms
        ]


def closed_through(history: ResourceHistory) -> int | None:
    """The end of the resource's last segment when every segment is closed (0 when it has
    none); None while any is open: an open history still bills every new window, and so does
    a VM created and not yet billed as allocated (its first start opens it: [policy])."""
    if history.allocation_pending:
        return None
    ends = [s.end_ms for s in (*history.running, *history.allocated, *history.ip)]
    if any(end is None for end in ends):
        return None
    return max((end for end in ends if end is not None), default=0)


def window_floor(through_ms: int, window_ms: int) -> int:
    """The end of the window holding `through_ms` (itself on a boundary): windows ending by then
    spoke of a pruned past and are left as they were billed."""
    return -(-through_ms // window_ms) * window_ms
