"""The hand-off's outbox: billable items written in the transaction that made them, then
claimed, confirmed and pruned by the relay (collector/outbox_relay.py).

A relay claims a batch of pending rows for a lease (PostgreSQL: the rows it picks are locked
`FOR UPDATE SKIP LOCKED`, so two replicas never claim the same row at once; SQLite: one writer
at a time), delivers them outside any transaction, then marks each sink's confirmation. A relay
killed mid-delivery marks nothing: its lease lapses and the rows are delivered again (at least
once; the transaction ids make the second delivery harmless).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from kvmeter.collector import billable
from kvmeter.collector.schema import handoff_outbox
from kvmeter.collector.store.engine import StoreCore, analyze_after_commit, slices

TOPIC = "topic"
WEBHOOK = "webhook"
SINK_COLUMNS = {TOPIC: "topic_sent_ms", WEBHOOK: "webhook_sent_ms"}
REFUSED_COLUMNS = {WEBHOOK: "webhook_refused_ms"}  # a sink that can refuse one item for good
RETRY_COLUMNS = {WEBHOOK: "webhook_retry_ms"}  # when that sink is offered a refused item again
ANALYZE_AFTER_ITEMS = 1000  # items added at once that read the outbox's statistics again (PostgreSQL)


@dataclass(frozen=True)
class OutboxRow:
    id: int
    transaction_id: str
    account: str
    item: str  # JSON
    topic_sent: bool
    webhook_sent: bool
    offered: frozenset[str]  # the sinks this claim hands it to


def _pick(conn: Connection, sink: str, limit: int, now_ms: int) -> list[int]:
    """The rows a claim offers `sink` (see claim_outbox): those never refused, oldest first,
    then the refused whose pause is over, the longest due first."""
    ob = handoff_outbox.c
    e = handoff_outbox.alias("earlier").c
    # an earlier version of the row's record that this sink lacks holds the row back. "Lacks" is
    # one term, which no index of pending rows answers: PostgreSQL looks the record up in
    # ix_handoff_outbox_record whatever its statistics (taking a burst's items, added since the
    # last ANALYZE, for one row, it read every pending item for each candidate).
    lacking = sa.func.coalesce(e.sent_ms, e[SINK_COLUMNS[sink]]).is_(None)
    held = sa.exists().where(e.record == ob.record, e.version < ob.version, lacking)
    return pick_free(conn, sink, limit, now_ms, ~held)


def pick_free(conn: Connection, sink: str, limit: int, now_ms: int, *also: Any) -> list[int]:
    """Up to `limit` rows pending for `sink` and not under another claim that meet `also`, in
    _pick's order, locked (others skip them)."""
    ob = handoff_outbox.c
    free = (
        sa.or_(ob.claimed_until_ms.is_(None), ob.claimed_until_ms < now_ms),
        ob[SINK_COLUMNS[sink]].is_(None),
        *also,
    )
    # Each sink's pick walks that sink's own index in its order (ix_handoff_outbox_topic, by id;
    # ix_handoff_outbox_webhook): a claim reads what it takes and stops, however many pending rows
    # the sink already has or refused (it walked every pending row, then sorted the refused).
    # SQLite, without statistics, takes "pending" for as selective a term as the sink's and may
    # walk the pending index instead (which of the two is first in its schema decides): likely()
    # says it is not.
    pending = ob.sent_ms.is_(None)
    common = sa.func.likely(pending) if conn.dialect.name == "sqlite" else pending
    # By id: the sink's column is NULL in all its rows (said so, that PostgreSQL walks the sink's
    # index in this order and stops, not the primary key past every sent row, whatever it believes
    # of how many are pending).
    phases: list[tuple[Any, tuple[Any, ...]]] = [(common, (ob[SINK_COLUMNS[sink]], ob.id))]
    if sink in RETRY_COLUMNS:
        # A row refused by a replica older than migration 28 (no retry time) is in the first.
        due = ob[RETRY_COLUMNS[sink]]
        phases = [  # the first by id: due is NULL in all its rows (said so, to use the index)
            (sa.and_(common, due.is_(None)), (due, ob.id)),
            (sa.and_(common, due.is_not(None), due <= now_ms), (due, ob.id)),
        ]
    picked: list[int] = []
    for which, order in phases:
        if len(picked) >= limit:
            break
        query = (
            sa.select(ob.id)
            .where(which, *free)
            .order_by(*order)
            .limit(limit - len(picked))
            .with_for_update(skip_locked=True)
        )
        picked += [int(row[0]) for row in conn.execute(query)]
    return picked


def add_items(conn: Connection, store: StoreCore, items: Sequence[dict[str, Any]], now_ms: int) -> None:
    """Put billable items in the outbox (a transaction id already there is left alone)."""
    if not items:
        return
    rows = [
        {
            "transaction_id": item["transaction_id"],
            "account": item["account"],
            "item": billable.encode(item),
            "created_ms": now_ms,
            "record": billable.record_of(item),
            "version": item["version"],
        }
        for item in items
    ]
    stmt = store._insert(handoff_outbox).on_conflict_do_nothing(index_elements=["transaction_id"])
    for part in slices(rows):
        conn.execute(stmt, list(part))
    if len(rows) >= ANALYZE_AFTER_ITEMS:  # a finalization's burst: claims planned for it
        analyze_after_commit(conn, handoff_outbox.name)


def carry(source: Connection, into: Connection, store: StoreCore) -> int:
    """A rebuild: the live store's rows not yet confirmed by every sink (with the confirmations
    they have), so that the store put in service delivers them; returns how many."""
    if not sa.inspect(source).has_table(handoff_outbox.name):
        return 0
    ob = handoff_outbox.c
    columns = (ob.transaction_id, ob.account, ob.item, ob.created_ms, ob.topic_sent_ms, ob.webhook_sent_ms)
    refusals = (ob.record, ob.version, ob.webhook_refused_ms, ob.webhook_retry_ms)
    query = sa.select(*columns, *refusals).where(ob.sent_ms.is_(None)).order_by(ob.id)
    rows = [dict(row._mapping) for row in source.execute(query)]
    stmt = store._insert(handoff_outbox).on_conflict_do_nothing(index_elements=["transaction_id"])
    for part in slices(rows):
        into.execute(stmt, list(part))
    return len(rows)


class Outbox(StoreCore):
    """The relay's statements, each in its own short transaction."""

    def claim_outbox(self, limit: int, now_ms: int, lease_ms: int, sinks: Iterable[str]) -> list[OutboxRow]:
        """Up to `limit` pending rows per sink that no live lease holds, leased to the caller,
        each with the sinks it is offered to. Per sink: rows one sink cannot get rid of (its
        receiver down) do not keep the next rows from the other sink; of a record, only the first
        version the sink lacks (its versions reach a sink in order); oldest first, except that
        an item the webhook refused waits out its pause (refuse_outbox), then comes after all
        the others, the longest due first: items refused for good, however many, never keep a
        newer item waiting."""
        offers: dict[int, set[str]] = {}
        with self.write() as conn:
            for sink in sinks:
                for row_id in _pick(conn, sink, limit, now_ms):
                    offers.setdefault(row_id, set()).add(sink)
            ids = sorted(offers)
            if not ids:
                return []
            ob = handoff_outbox.c
            conn.execute(
                sa.update(handoff_outbox)
                .where(ob.id.in_(ids))
                .values(claimed_until_ms=now_ms + lease_ms, attempts=ob.attempts + 1)
            )
            rows = conn.execute(
                sa.select(ob.id, ob.transaction_id, ob.account, ob.item, ob.topic_sent_ms, ob.webhook_sent_ms)
                .where(ob.id.in_(ids))
                .order_by(sa.func.coalesce(ob.webhook_refused_ms, 0), ob.id)  # the refused last
            )
            return [
                OutboxRow(
                    int(r[0]), r[1], r[2], r[3], r[4] is not None, r[5] is not None, frozenset(offers[r[0]])
                )
                for r in rows
            ]

    def refuse_outbox(
        self, refused: Mapping[int, str], sink: str, now_ms: int, pause_ms: tuple[int, int]
    ) -> None:
        """`sink` refused these rows (row id: its answer): still pending, counted as refused, and
        offered again once a pause is over, after every other pending row. The pause is
        pause_ms[0] after a first refusal and twice the last one after each next, up to
        pause_ms[1]: a receiver that refuses an item for good is not sent it every round."""
        ob = handoff_outbox.c
        most = sa.literal(pause_ms[1], sa.BigInteger)
        first = sa.literal(min(pause_ms), sa.BigInteger)
        last = ob[RETRY_COLUMNS[sink]] - ob[REFUSED_COLUMNS[sink]]  # the pause it waited out (old values)
        pause = sa.case(
            (ob[RETRY_COLUMNS[sink]].is_(None), first),
            (2 * last < first, first),
            (2 * last > most, most),
            else_=2 * last,
        )
        with self.write() as conn:
            for row_id, reason in refused.items():
                conn.execute(
                    sa.update(handoff_outbox)
                    .where(ob.id == row_id, ob.sent_ms.is_(None), ob[SINK_COLUMNS[sink]].is_(None))
                    .values(
                        {
                            REFUSED_COLUMNS[sink]: now_ms,
                            RETRY_COLUMNS[sink]: sa.literal(now_ms, sa.BigInteger) + pause,
                            "last_error": f"refused: {reason}"[:1000],
                        }
                    )
                )

    def confirm_outbox(self, ids: Sequence[int], sink: str, now_ms: int, sinks: Iterable[str]) -> None:
        """`sink` confirmed these rows; a row every configured sink confirmed is sent."""
        if not ids:
            return
        ob = handoff_outbox.c
        done = sa.and_(*(ob[SINK_COLUMNS[s]].is_not(None) for s in sinks))
        with self.write() as conn:
            for part in slices(list(ids)):
                conn.execute(
                    sa.update(handoff_outbox).where(ob.id.in_(part)).values({SINK_COLUMNS[sink]: now_ms})
                )
                conn.execute(
                    sa.update(handoff_outbox)
                    .where(ob.id.in_(part), ob.sent_ms.is_(None), done)
                    .values(sent_ms=now_ms, claimed_until_ms=None, last_error=None)
                )

    def settle_outbox(self, sinks: Iterable[str], now_ms: int) -> int:
        """Rows every configured sink has are sent: a sink taken out of the config leaves no
        row waiting for it for ever (pending, held from pruning, the stalled alert firing)."""
        ob = handoff_outbox.c
        done = [ob[SINK_COLUMNS[s]].is_not(None) for s in sinks]
        if not done:
            return 0
        with self.write() as conn:
            result = conn.execute(
                sa.update(handoff_outbox)
                .where(ob.sent_ms.is_(None), *done)
                .values(sent_ms=now_ms, claimed_until_ms=None, last_error=None)
            )
        return int(result.rowcount or 0)

    def renew_outbox(
        self, ids: Sequence[int], until_ms: int, now_ms: int, held_until: int | None = None
    ) -> int:
        """Extend the lease on these rows while their delivery goes on (rows sent meanwhile, or
        whose lease already lapsed, are left alone; with held_until, the lease this relay set
        last, so also rows another relay claimed since); returns the rows renewed."""
        ob = handoff_outbox.c
        renewed = 0
        held = [] if held_until is None else [ob.claimed_until_ms == held_until]
        with self.write() as conn:
            for part in slices(list(ids)):
                result = conn.execute(
                    sa.update(handoff_outbox)
                    .where(ob.id.in_(part), ob.sent_ms.is_(None), ob.claimed_until_ms >= now_ms, *held)
                    .values(claimed_until_ms=until_ms)
                )
                renewed += int(result.rowcount or 0)
        return renewed

    def release_outbox(self, ids: Sequence[int], error: str, held_until: int | None = None) -> None:
        """Delivery failed: the rows are free for the next attempt, with the reason kept (a row
        the webhook refused keeps its answer). With held_until (the lease the caller set last),
        only rows still under that lease: a row another relay claimed after the caller's lease
        lapsed stays that relay's."""
        if not ids:
            return
        ob = handoff_outbox.c
        held = [] if held_until is None else [ob.claimed_until_ms == held_until]
        # a row the webhook refused keeps the receiver's answer (what the operator looks for: the
        # README's query), not the error of a later round that stopped before reaching it
        refused = sa.and_(ob.webhook_refused_ms.is_not(None), ob.webhook_sent_ms.is_(None))
        reason = sa.case((refused, ob.last_error), else_=sa.literal(error[:1000]))
        with self.write() as conn:
            for part in slices(list(ids)):
                conn.execute(
                    sa.update(handoff_outbox)
                    .where(ob.id.in_(part), ob.sent_ms.is_(None), *held)
                    .values(claimed_until_ms=None, last_error=reason)
                )

    def outbox_stats(self) -> tuple[int, int | None]:
        """(rows pending, created_ms of the oldest pending row or None)."""
        ob = handoff_outbox.c
        with self.read() as conn:
            row = conn.execute(
                sa.select(sa.func.count(), sa.func.min(ob.created_ms)).where(ob.sent_ms.is_(None))
            ).one()
        return int(row[0]), (None if row[1] is None else int(row[1]))

    def outbox_refused(self) -> int:
        """Pending rows the webhook refused (a 4xx about the item) the last time it got them."""
        ob = handoff_outbox.c
        refused = sa.select(sa.func.count()).where(
            ob.sent_ms.is_(None), ob.webhook_sent_ms.is_(None), ob.webhook_refused_ms.is_not(None)
        )
        with self.read() as conn:
            return int(conn.execute(refused).scalar() or 0)

    def outbox_used(self) -> bool:
        """Whether the store has ever had items to hand off (kept until retention prunes them): a
        collector with [handoff] runs on it, so whatever finalizes or adjusts must add items."""
        with self.read() as conn:
            return conn.execute(sa.select(handoff_outbox.c.id).limit(1)).first() is not None
