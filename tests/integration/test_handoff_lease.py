"""The relay's lease (both databases): a round that delivers for longer than its lease keeps its
items (renewed every third of the lease: another relay claims none of them meanwhile), and a
relay that dies mid-round (nothing renews, nothing is released) leaves its items to the others
one lease later. The default lease is short since it is renewed."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import replace

from prometheus_client import CollectorRegistry

from kvmeter.collector.config_handoff import HandoffConfig
from kvmeter.collector.outbox_relay import HandoffMetrics, Relay
from kvmeter.collector.store import Store
from kvmeter.collector.store.outbox import OutboxRow
from tests.integration.test_handoff_relay import fill, outbox_ids

# 1.2 s: renewed every 0.4 s, so a renewal the loaded CI machine runs up to 0.8 s late still holds
LEASE = replace(HandoffConfig(), webhook_url="http://127.0.0.1:9/unused", lease_s=1.2, batch_size=100)


class SlowSink:
    """Confirms every row it is given, after `hold` seconds (a receiver slow to acknowledge)."""

    name = "webhook"

    def __init__(self, hold: float = 0.0):
        self.hold = hold
        self.got: list[str] = []
        self.started = threading.Event()
        self.returned = threading.Event()  # a delivery came back: its confirmations may follow

    def deliver(self, rows: Sequence[OutboxRow]) -> tuple[list[int], str]:
        self.started.set()
        time.sleep(self.hold)
        self.got += [r.transaction_id for r in rows]
        self.returned.set()
        return [r.id for r in rows], ""

    def close(self) -> None:
        return


def relay(store: Store, sink: SlowSink) -> Relay:
    r = Relay(store, LEASE, HandoffMetrics(CollectorRegistry(), store))
    r.sinks = [sink]
    return r


def test_the_default_lease_is_short() -> None:
    assert HandoffConfig().lease_s == 30


def test_a_round_longer_than_its_lease_keeps_its_items(store_url: str) -> None:
    store = fill(store_url)
    expected = outbox_ids(store)
    slow, other = SlowSink(hold=3 * LEASE.lease_s), SlowSink()
    first, second = relay(store, slow), relay(store, other)
    done: list[tuple[int, bool]] = []
    round_thread = threading.Thread(target=lambda: done.append(first.round()))
    round_thread.start()
    assert slow.started.wait(10)
    while True:  # three leases long: the other relay keeps trying
        claimed = second.round()
        # Once the slow delivery came back, its items are confirmed and their records' next
        # versions are free to claim: only a claim made before that is a live round's item.
        if slow.returned.is_set():
            break
        assert claimed == (0, True), "the other relay claimed items of a live round"
        time.sleep(0.05)
    round_thread.join()
    first_round = set(slow.got)
    assert done == [(len(first_round), True)]
    assert not first_round & set(other.got), "an item of the live round went out twice"
    slow.hold = 0  # a record's later versions follow in the next rounds (each after the one before)
    while first.round()[0] + second.round()[0]:
        pass
    assert sorted(slow.got + other.got) == sorted(expected)  # each item once
    assert store.outbox_stats() == (0, None)
    store.close()


def test_items_of_a_relay_that_died_mid_round_go_out_one_lease_later(store_url: str) -> None:
    store = fill(store_url)
    expected = outbox_ids(store)
    # A relay claims a round and dies (kill -9): no renewal, no release.
    claimed = store.claim_outbox(100, int(time.time() * 1000), LEASE.lease_ms, ["webhook"])
    assert {r.transaction_id for r in claimed} < expected  # later versions wait for the first
    other = SlowSink()
    second = relay(store, other)
    assert second.round() == (0, True), "held by the dead relay's lease"
    started = time.monotonic()
    while not other.got:
        assert time.monotonic() - started < 5 * LEASE.lease_s
        second.round()
        time.sleep(0.05)
    assert time.monotonic() - started >= LEASE.lease_s * 0.5
    while second.round()[0]:
        pass
    assert set(other.got) == expected
    store.close()
