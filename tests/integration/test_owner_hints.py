"""A router's owner comes from CloudStack's <metadata> in the agent's inventory, which rides on a
batch only now and then: the collector keeps it for the batches in between, across replicas."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmeter.collector.model import NETWORK_BYTES_SENT, Settings
from kvmeter.collector.service import Collector
from kvmeter.collector.store import Store
from kvmeter.proto import pb
from tests.collector_support import ACCT_A, ROUTER, T0, Clock, M, Stream

OWNER = {"ownerAccountUuid": ACCT_A, "ownerAccountName": "alice"}


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.pg)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    url = (
        f"sqlite:///{tmp_path}/usage.db"
        if request.param == "sqlite"
        else request.getfixturevalue("pg_database")
    )
    s = Store(url)
    s.migrate()
    yield s
    s.close()


def router_bytes(start: int, nbytes: int) -> M:
    return M(
        start,
        start + 1000,
        nbytes,
        direction=pb.VM_TX,
        instance=ROUTER,
        domain="r-5-VM",
        mac="02:00:05:00:00:03",
    )


def billed_to(store: Store, account: str) -> int:
    return sum(
        q for k, q in store.net_usage().items() if k.account == account and k.usage_type == NETWORK_BYTES_SENT
    )


def test_owner_from_an_earlier_batch_and_another_replica(store: Store) -> None:
    clock = Clock(T0 + 60_000)
    a, b = Collector(store, Settings(), clock), Collector(store, Settings(), clock)
    stream = Stream("s1", owners={"r-5-VM": OWNER})
    a.apply_batch(stream.batch([router_bytes(T0, 100)]))  # with the inventory
    stream.owners = {}
    a.apply_batch(stream.batch([router_bytes(T0 + 1000, 200)]))  # without: remembered
    b.apply_batch(stream.batch([router_bytes(T0 + 2000, 400)]))  # another replica: from the store
    assert billed_to(store, ACCT_A) == 700
    assert store.stats(0)["parked_bytes"] == 0


def test_bytes_parked_before_the_inventory_are_billed_when_it_arrives(store: Store) -> None:
    collector = Collector(store, Settings(), Clock(T0 + 60_000))
    early, late = Stream("s-old"), Stream("s-new", owners={"r-5-VM": OWNER})
    collector.apply_batch(early.batch([router_bytes(T0, 300)]))  # owner unknown yet: parked
    assert store.stats(0)["parked_bytes"] == 300
    assert billed_to(store, ACCT_A) == 0
    collector.apply_batch(late.batch([router_bytes(T0 + 5000, 50)]))
    assert billed_to(store, ACCT_A) == 350
    assert store.stats(0)["parked_bytes"] == 0
