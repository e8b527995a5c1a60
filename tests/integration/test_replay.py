"""Replay equals live: the topics replayed from offset 0 into an empty store give the same net
usage per key (record + adjustments) as the live run that saw late events, late owners,
duplicates and windows finalizing while it consumed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from kvmeter.collector.store import Store, usage_adjustments
from tests.collector_support import (
    ACCT_A,
    ACCT_B,
    HOUR,
    MIN,
    T0,
    VM2,
    VM3,
    Clock,
    M,
    Stream,
    scenario,
    usage_event,
)
from tests.integration.test_consume_live import Running, kafka_config, produce, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.pg]


def adjustments(store: Store) -> int:
    with store.read() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(usage_adjustments)).scalar() or 0)


def test_replay_from_offset_zero_into_an_empty_store_equals_live(
    kafka_bootstrap: str, unique_topic: Callable[..., str], tmp_path: Path, pg_database: str
) -> None:
    measures, lifecycle = unique_topic("measures", partitions=3), unique_topic("cloudstack", partitions=2)
    sc = scenario()
    clock = Clock(T0 + 3 * HOUR)
    live_store = Store(f"sqlite:///{tmp_path}/live.db")
    live_store.migrate()
    live = Running(live_store, kafka_config(kafka_bootstrap, measures, lifecycle, f"live-{measures}"), clock)
    try:
        # Phase 1, at T0+3h: the scenario as it happens.
        produce(kafka_bootstrap, lifecycle, sc.events)
        produce(kafka_bootstrap, measures, [(f"h{i % 2}".encode(), b) for i, b in enumerate(sc.batches)])
        wait_for(lambda: sum(live_store.marks().values()) == 4, 60, "phase 1 applied")
        # Phase 2, at T0+6h: windows up to T0+4h are final by now, then late news arrives.
        clock.now = T0 + 6 * HOUR
        wait_for(
            lambda: any(r.final for r in live_store.usage(T0 + 3 * HOUR, T0 + 4 * HOUR)), 30, "finalized"
        )
        late_stream = Stream("stream-h9", "h9")
        produce(
            kafka_bootstrap,
            lifecycle,
            [
                usage_event("VM.STOP", VM2, ACCT_B, T0 + 90 * MIN),  # VM2 really stopped long ago
                usage_event("VM.CREATE", VM3, ACCT_B, T0),  # the parked VM3 bytes get an owner
                (None, b'{"event": "VM.START"}'),  # poison
            ],
        )
        produce(
            kafka_bootstrap,
            measures,
            [
                (b"h9", late_stream.batch([M(T0 + 5 * MIN, T0 + 6 * MIN, 4242)])),  # late bytes, final window
                (b"h9", late_stream.batch([M(T0 + 5 * HOUR, T0 + 5 * HOUR + MIN, 99, instance=VM2)])),
                (b"h0", sc.batches[0]),  # a duplicate
            ],
        )
        produce(kafka_bootstrap, lifecycle, [usage_event("NET.IPASSIGN", "ip-late", ACCT_A, T0 + 4 * HOUR)])
        wait_for(lambda: live_store.marks().get("stream-h9") == 2, 60, "phase 2 applied")
        wait_for(lambda: live.live.totals.known_events + live.live.totals.events >= 9, 60, "all events")
    finally:
        live.stop()
    clock.now = T0 + 8 * HOUR  # VM2's late bytes of T0+5h (stopped since T0+90min) wait until final
    live.collector.tick()  # the last word
    live_net = live_store.net_usage()
    assert adjustments(live_store) > 0  # the live run did correct final windows
    assert live_store.parked_rows() == []

    replay_store = Store(pg_database)
    replay_store.migrate()
    replay = Running(
        replay_store, kafka_config(kafka_bootstrap, measures, lifecycle, f"replay-{measures}"), clock
    )
    try:
        wait_for(lambda: replay_store.marks() == live_store.marks(), 60, "the replay consumed everything")
    finally:
        replay.stop()
    replay.collector.tick()
    assert replay_store.net_usage() == live_net
    assert len(replay_store.dead_letter_rows()) == len(live_store.dead_letter_rows()) == 1
    live_store.close()
    replay_store.close()
