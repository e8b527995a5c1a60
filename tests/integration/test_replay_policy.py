"""A changed billing policy, rebuilt from the topics: the same stored events and measures replayed
from offset 0 into a fresh store under another [policy] give the records of that policy (worked
out by hand below), and the same bytes."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from kvmeter.collector.model import Settings
from kvmeter.collector.policy import BillingPolicy
from kvmeter.collector.schema import billing_policies
from kvmeter.collector.store import Store
from kvmeter.proto import pb
from tests.collector_support import ACCT_A, HOUR, IP1, MIN, T0, VM1, Clock, M, Stream, cs_time, usage_event
from tests.harness.processes import KVMETER
from tests.integration.test_consume_live import Running, kafka_config, produce, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.pg]
NOW = T0 + 5 * HOUR


def state_event(old: str, new: str, at_ms: int) -> tuple[bytes, bytes]:
    """(key, value) of a VM's resource-state event as the Kafka event bus publishes it."""
    doc = {"resource": "VirtualMachine", "id": VM1, "old-state": old, "new-state": new,
           "status": "postStateTransitionEvent", "eventDateTime": cs_time(at_ms)}  # fmt: skip
    return VM1.encode(), json.dumps(doc).encode()


# The usage events and the state events disagree: the state event of the start comes 10 minutes
# after the usage event, a power-off is told by a state event 10 minutes before the usage STOP;
# the VM is destroyed at +2h and expunged at +3h.
EVENTS = [
    usage_event("VM.CREATE", VM1, ACCT_A, T0 - HOUR),
    usage_event("NET.IPASSIGN", IP1, ACCT_A, T0 + 15 * MIN),
    usage_event("VM.START", VM1, ACCT_A, T0 + 30 * MIN),
    state_event("Starting", "Running", T0 + 40 * MIN),
    state_event("Running", "Stopped", T0 + 80 * MIN),
    usage_event("VM.STOP", VM1, ACCT_A, T0 + 90 * MIN),
    usage_event("VM.DESTROY", VM1, ACCT_A, T0 + 2 * HOUR),
    state_event("Stopped", "Destroyed", T0 + 2 * HOUR),
    state_event("Destroyed", "Expunging", T0 + 3 * HOUR),
    usage_event("NET.IPRELEASE", IP1, ACCT_A, T0 + 4 * HOUR),
]
BYTES = {  # the same under every policy: bytes follow the owner, not the segments
    (4, T0): 1000,
    (4, T0 + 2 * HOUR): 700,
    (5, T0 + HOUR): 300,
}
IP_TIME = {(3, T0): 45 * MIN, (3, T0 + HOUR): HOUR, (3, T0 + 2 * HOUR): HOUR, (3, T0 + 3 * HOUR): HOUR}

# {(usage type, window start): quantity} of VM1 and IP1 under each policy.
DEFAULT = {  # running 0:30 (usage) -> 1:20 (state); allocated -1:00 -> 2:00 (destroy)
    (1, T0): 30 * MIN, (1, T0 + HOUR): 20 * MIN,
    (2, T0 - HOUR): HOUR, (2, T0): HOUR, (2, T0 + HOUR): HOUR,
    **IP_TIME, **BYTES,
}  # fmt: skip
STATE_FIRST_START_EXPUNGE = {  # running 0:40 -> 1:20 (state); allocated 0:40 (first start) -> 3:00
    (1, T0): 20 * MIN, (1, T0 + HOUR): 20 * MIN,
    (2, T0): 20 * MIN, (2, T0 + HOUR): HOUR, (2, T0 + 2 * HOUR): HOUR,
    **IP_TIME, **BYTES,
}  # fmt: skip
USAGE_ONLY = {  # running 0:30 -> 1:30 (usage); allocated -1:00 -> 2:00
    (1, T0): 30 * MIN, (1, T0 + HOUR): 30 * MIN,
    (2, T0 - HOUR): HOUR, (2, T0): HOUR, (2, T0 + HOUR): HOUR,
    **IP_TIME, **BYTES,
}  # fmt: skip


CHANGED = BillingPolicy(allocated_from="first_start", allocated_until="expunge", running="state")


def records(store: Store) -> dict[tuple[int, int], int]:
    net = store.net_usage()
    assert {k.account for k in net} == {ACCT_A}
    return {(k.usage_type, k.window_start_ms): v for k, v in net.items()}


def run_until_consumed(
    store: Store, bootstrap: str, topics: tuple[str, str], group: str, policy: BillingPolicy
) -> dict[tuple[int, int], int]:
    """One collector over the topics from offset 0 under `policy`, until it consumed everything."""
    store.migrate()
    running = Running(store, kafka_config(bootstrap, *topics, group), Clock(NOW), Settings(policy=policy))
    try:
        wait_for(lambda: store.marks().get("stream-p1") == 2, 60, "the measures applied")
        wait_for(lambda: running.live.totals.events == len(EVENTS), 60, "every event stored")
    finally:
        running.stop()
    running.collector.tick()
    return records(store)


def test_a_changed_policy_rebuilt_from_the_topics_gives_its_records(
    kafka_bootstrap: str, unique_topic: Callable[..., str], tmp_path: Path, pg_database: str
) -> None:
    measures, lifecycle = unique_topic("measures", partitions=2), unique_topic("cloudstack", partitions=2)
    produce(kafka_bootstrap, lifecycle, EVENTS)
    stream = Stream("stream-p1", "p1")
    produce(kafka_bootstrap, measures, [
        (b"p1", stream.batch([M(T0 + 5 * MIN, T0 + 6 * MIN, 1000),
                              M(T0 + 65 * MIN, T0 + 66 * MIN, 300, direction=pb.VM_RX)])),
        (b"p1", stream.batch([M(T0 + 150 * MIN, T0 + 151 * MIN, 700)])),  # destroyed, still its owner's
    ])  # fmt: skip
    topics = (measures, lifecycle)

    live = Store(f"sqlite:///{tmp_path}/live.db")
    assert run_until_consumed(live, kafka_bootstrap, topics, f"live-{measures}", BillingPolicy()) == DEFAULT

    rebuilt = Store(pg_database)
    got = run_until_consumed(rebuilt, kafka_bootstrap, topics, f"pg-{measures}", CHANGED)
    assert got == STATE_FIRST_START_EXPUNGE

    usage_only = Store(f"sqlite:///{tmp_path}/usage-only.db")
    got = run_until_consumed(
        usage_only, kafka_bootstrap, topics, f"lite-{measures}", BillingPolicy(running="usage")
    )
    assert got == USAGE_ONLY
    # The stored events are the same in every store: only the policy differs.
    for store in (rebuilt, usage_only):
        assert stored_event_ids(store) == stored_event_ids(live)
        assert store.marks() == live.marks()
        store.close()
    assert len(stored_event_ids(live)) == len(EVENTS)
    live.close()


def stored_event_ids(store: Store) -> set[str]:
    with store.read() as conn:
        return {row[3] for row in store.events_since(conn, 0, 1000)}


def test_kvmeter_rebuild_under_a_changed_policy_gives_its_records_and_shows_what_changes(
    kafka_bootstrap: str, unique_topic: Callable[..., str], tmp_path: Path, pg_database: str
) -> None:
    measures, lifecycle = unique_topic("measures", partitions=2), unique_topic("cloudstack", partitions=2)
    produce(kafka_bootstrap, lifecycle, EVENTS)
    stream = Stream("stream-p1", "p1")
    produce(kafka_bootstrap, measures, [
        (b"p1", stream.batch([M(T0 + 5 * MIN, T0 + 6 * MIN, 1000),
                              M(T0 + 65 * MIN, T0 + 66 * MIN, 300, direction=pb.VM_RX)])),
        (b"p1", stream.batch([M(T0 + 150 * MIN, T0 + 151 * MIN, 700)])),
    ])  # fmt: skip
    live = Store(f"sqlite:///{tmp_path}/live.db")
    topics = (measures, lifecycle)
    assert run_until_consumed(live, kafka_bootstrap, topics, f"live-{measures}", BillingPolicy()) == DEFAULT
    live.close()

    config = tmp_path / "changed.toml"  # the live config with another [policy]
    config.write_text(f"""
[store]
url = "sqlite:///{tmp_path}/live.db"
[kafka]
bootstrap = "{kafka_bootstrap}"
measures_topic = "{measures}"
lifecycle_topic = "{lifecycle}"
[policy]
allocated_from = "first_start"
allocated_until = "expunge"
running = "state"
""")
    done = subprocess.run(
        [*KVMETER, "rebuild", "--config", str(config), "--into", pg_database, "--check"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr  # it bills differently: --check says so
    rebuilt = Store(pg_database)
    try:
        assert records(rebuilt) == STATE_FIRST_START_EXPUNGE
        with rebuilt.read() as conn:  # the rebuilt store knows the policy its records follow
            kept = conn.execute(sa.select(billing_policies.c.policy)).scalars().all()
        assert kept == [CHANGED.describe()]
    finally:
        rebuilt.close()
    # The diff, by account, type and window: the RUNNING and ALLOCATED windows that change.
    changed = {k for k in set(DEFAULT) | set(STATE_FIRST_START_EXPUNGE)
               if DEFAULT.get(k) != STATE_FIRST_START_EXPUNGE.get(k)}  # fmt: skip
    assert f"{len(changed)} difference(s) by account, usage type and window" in done.stdout
