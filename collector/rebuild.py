"""A new store from the history: the topics and the live store's raw lifecycle events, replayed
through the live code path under the current config (`kvmeter rebuild`).

Order, as the live collector catches up: lifecycle first, then measures, then one tick.
- Lifecycle: the lifecycle topic whole (where Kafka carries it), then every raw event of the live
  store, parsed again from its payload and key with its delivery order: they hold what came by
  RabbitMQ, webhooks, files or reconciliation, and what the topic no longer retains. An event is
  stored once by its digest, so one found in both counts once.
- Measures: the measures topic whole, each chunk applied at its records' broker time (never
  later than now): a measure still without an owner is parked then, and the tick reports it as
  unattributed past the horizon as the live run did. Stream marks drop duplicates.
- The tick, at now: open windows grown, windows past the grace period final.
Before all that, the live store's record versions are carried over (store/versions.py): the
rebuilt store folds late changes into each record as it finalizes it at once, and its next
adjustment of a window continues after the live store's last version instead of giving a
transaction id the live store already handed off to other content; so are the running totals
its items' costs were made under (store/item_costs.py); so are the credits, balance states
and low-balance alerts, with their ids (store/credits.py: no history holds them).
The topics are read by a consumer of its own (kafka_history.read_topic): the live consumer
group's offsets do not move.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Message

from kvmeter.collector.cloudstack import kept_key
from kvmeter.collector.config import KafkaConfig
from kvmeter.collector.kafka_history import read_topic
from kvmeter.collector.model import Outcome, Record, Settings
from kvmeter.collector.schema import lifecycle_events, stream_marks, usage_records
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store, credits, item_costs, outbox, versions
from kvmeter.proto import pb

log = logging.getLogger(__name__)

STORED_PAGE = 1000


class RebuildError(RuntimeError):
    pass


@dataclass
class Rebuilt:
    """What the rebuild read and what applying it did."""

    lifecycle_records: int = 0  # from the lifecycle topic
    stored_events: int = 0  # raw events of the live store
    measure_records: int = 0  # from the measures topic
    carried_versions: int = 0  # record versions of the live store carried over
    outcome: Outcome = field(default_factory=Outcome)


class ReplayClock:
    """Now, or the broker time of the records being applied when that is earlier."""

    def __init__(self, wall: Callable[[], int]):
        self.wall = wall
        self.at: int | None = None

    def __call__(self) -> int:
        now = self.wall()
        return now if self.at is None else min(self.at, now)


def check_empty(store: Store) -> None:
    """A rebuild writes into a new store only: one that holds records, events or marks is refused."""
    with store.read() as conn:
        for table in (usage_records, lifecycle_events, stream_marks):
            if conn.execute(sa.select(sa.literal(1)).select_from(table).limit(1)).first() is not None:
                raise RebuildError(f"the target store is not empty ({table.name} has rows): give a new one")


def rebuild(
    settings: Settings,
    kafka: KafkaConfig | None,
    live: Store,
    into: Store,
    wall: Callable[[], int],
    *,
    progress: Callable[[str], None] = lambda _line: None,
) -> Rebuilt:
    """Replay everything into `into` (migrated and empty); returns what was read and done."""
    check_empty(into)
    with live.read() as source, into.write() as conn:
        done = Rebuilt(carried_versions=versions.carry(conn, into, versions.given(source)))
        item_costs.carry(source, conn, into)
        outbox.carry(source, conn, into)  # items no sink confirmed yet: the new store sends them
        credits.carry(source, conn, postgres=into.is_postgres)  # their only ledger; alerts' ids
        live_through = live.finalized_through(source, lock=False)
    clock = ReplayClock(wall)
    collector = Collector(into, settings, clock)
    if kafka is not None and kafka.bootstrap:
        for chunk in read_topic(kafka, kafka.lifecycle_topic, chunk=kafka.batch_size):
            done.lifecycle_records += len(chunk)
            done.outcome.add(collector.apply_events(_records(chunk)))
        progress(f"lifecycle topic {kafka.lifecycle_topic}: {done.lifecycle_records} record(s)")
    for records in stored_events(live):
        done.stored_events += len(records)
        done.outcome.add(collector.apply_events(records))
    progress(f"live store: {done.stored_events} raw lifecycle event(s)")
    if kafka is not None and kafka.bootstrap:
        for chunk in read_topic(kafka, kafka.measures_topic, chunk=kafka.batch_size):
            done.measure_records += len(chunk)
            clock.at = max((t for m in chunk if (t := _broker_ms(m)) is not None), default=None)
            done.outcome.add(collector.apply_batches(_records(chunk)))
        clock.at = None
        progress(f"measures topic {kafka.measures_topic}: {done.measure_records} record(s)")
    # Windows the live store has not finalized stay open: the collector put in service on the new
    # store finalizes them and hands them off (version 0), as the live one would have.
    done.outcome.add(collector.tick(finalize_through=live_through))
    return done


def stored_events(live: Store, page: int = STORED_PAGE) -> Iterator[list[Record]]:
    """The live store's raw events as records to parse again, a page at a time, in commit order,
    each with the key it was parsed with and its place in its source's delivery order."""
    last = 0
    while True:
        with live.read() as conn:
            rows = live.raw_events_after(conn, last, page)
        if not rows:
            return
        records = []
        for _, row_id, raw, kept, resource, normalized in rows:
            ev = pb.LifecycleEvent.FromString(normalized)
            order = (ev.delivery_source, ev.delivery_seq) if ev.delivery_source else None
            records.append(Record(raw, kept_key(kept, resource), f"store:lifecycle_events/{row_id}", order))
        last = rows[-1][0]
        yield records


def _records(messages: Sequence[Message]) -> list[Record]:
    """As the live Kafka input makes them (same origin and delivery order)."""
    return [
        Record(
            m.value() or b"",
            m.key(),
            f"{m.topic()}/{m.partition()}@{m.offset()}",
            (f"{m.topic()}/{m.partition()}", m.offset() or 0),
        )
        for m in messages
    ]


def _broker_ms(message: Message) -> int | None:
    kind, ms = message.timestamp()
    return None if kind == TIMESTAMP_NOT_AVAILABLE else int(ms)
