"""The usage store: one schema on SQLite (embedded default, a file) and PostgreSQL (a DSN).

SQLAlchemy Core only, so it runs on Debian 12's SQLAlchemy 1.4.46 and on 2.x. Every time is an
integer of milliseconds since the epoch (UTC): no timezone or datetime type differences between
the two databases. The schema and its migrations are in collector/schema.py; this package holds
the statements, one module per table family (engine, streams, events, usage, parking, dead
letters, owners, pruning, the hand-off's outbox) and the read side (reads; pages: usage a page at a
time, with its count). `Store` is all of them in one object; the API's minted credentials
(credentials) are read beside it, by MintedCredentials(store), and the reconciler's tables
(reconciliation: corrections, CloudStack's names, the agents' witness, the last pass) by
functions over a connection.

Concurrency between replicas (PostgreSQL) rests on four locks, always taken in this order:
1. the `finalized_through` row of collector_state: shared by writers of usage, exclusive for
   the finalizer, so a window never turns final under a writer that saw it open;
2. per-resource advisory locks (sorted) for recomputing time-based records;
3. row locks of stream marks and parked measures (`FOR UPDATE`), so a batch or a parked
   measure is applied by one replica only (and of final records an adjustment versions);
4. last, just before the commit, the seq counters' rows, events' then adjustments'
   (store/sequence.py), so seqs are given in commit order.
A credit's transaction takes one lock only, its account's advisory lock (store/credits.py).
SQLite serialises writers with `BEGIN IMMEDIATE` instead.
"""

from __future__ import annotations

from kvmeter.collector.model import DeadLetter
from kvmeter.collector.schema import (
    KEY_COLUMNS,
    V1_TABLES,
    collector_state,
    dead_letters,
    lifecycle_events,
    metadata,
    parked_measures,
    quarantined_measures,
    schema_version,
    stream_gaps,
    stream_marks,
    unbilled_bytes,
    usage_adjustments,
    usage_records,
)
from kvmeter.collector.schema_migrations import MIGRATIONS
from kvmeter.collector.store.dead_letters import LETTER_STATES, DeadLetters, StoredLetter
from kvmeter.collector.store.engine import StoreTooNew, engine_url, shown_url, without_secret
from kvmeter.collector.store.events import LifecycleEvents
from kvmeter.collector.store.outbox import Outbox
from kvmeter.collector.store.owners import OwnerHints
from kvmeter.collector.store.pages import UsageFilter, UsagePage, UsagePager, UsagePages
from kvmeter.collector.store.parking import Parking
from kvmeter.collector.store.pruning import Pruning
from kvmeter.collector.store.reads import Adjustment, Reads, UsageRow
from kvmeter.collector.store.streams import StreamMarks
from kvmeter.collector.store.usage import UsageWrites

# Tables are re-exported: tests and tools reach them through the store.
__all__ = [
    "KEY_COLUMNS",
    "LETTER_STATES",
    "MIGRATIONS",
    "V1_TABLES",
    "Adjustment",
    "DeadLetter",
    "Store",
    "StoreTooNew",
    "StoredLetter",
    "UsageFilter",
    "UsagePage",
    "UsagePager",
    "UsageRow",
    "collector_state",
    "dead_letters",
    "engine_url",
    "lifecycle_events",
    "metadata",
    "parked_measures",
    "quarantined_measures",
    "schema_version",
    "shown_url",
    "stream_gaps",
    "stream_marks",
    "unbilled_bytes",
    "usage_adjustments",
    "usage_records",
    "without_secret",
]


class Store(
    StreamMarks,
    LifecycleEvents,
    Pruning,
    UsageWrites,
    Parking,
    DeadLetters,
    OwnerHints,
    Reads,
    UsagePages,
    Outbox,
):
    """One store: the engine (StoreCore, the common base) and every table family's statements."""
