"""The billing policy through the front door: `kvmeter collector --config FILE` with a [policy]
section bills RUNNING and ALLOCATED from the events that policy names (lifecycle from a real
broker, records read back from the API); a value it does not know stops it at start."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.collector_support import ACCT_A, HOUR, MIN, VM1, cs_time, usage_event
from tests.harness.ports import free_port
from tests.integration.test_collector_api_front import CollectorProcess, collectors  # noqa: F401 (fixture)
from tests.integration.test_consume_live import produce, wait_for

pytestmark = pytest.mark.broker


def get(port: int, path: str) -> dict:  # type: ignore[type-arg]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


def state_event(old: str, new: str, at_ms: int) -> tuple[bytes, bytes]:
    doc = {"resource": "VirtualMachine", "id": VM1, "old-state": old, "new-state": new,
           "status": "postStateTransitionEvent", "eventDateTime": cs_time(at_ms)}  # fmt: skip
    return VM1.encode(), json.dumps(doc).encode()


def test_the_configured_policy_decides_the_records(
    kafka_bootstrap: str,
    unique_topic: Callable[..., str],
    tmp_path: Path,
    collectors: list[CollectorProcess],  # noqa: F811
) -> None:
    start = (int(time.time() * 1000) // HOUR - 1) * HOUR  # the last whole hour: its window is complete
    lifecycle = unique_topic("l")
    produce(kafka_bootstrap, lifecycle, [
        usage_event("VM.CREATE", VM1, ACCT_A, start),
        usage_event("VM.START", VM1, ACCT_A, start + MIN),
        state_event("Starting", "Running", start + 5 * MIN),  # the state event of the start, late
        state_event("Running", "Stopped", start + 20 * MIN),  # a power-off ...
        usage_event("VM.STOP", VM1, ACCT_A, start + 30 * MIN),  # ... told late by its usage event
    ])  # fmt: skip
    port = free_port()
    policy = '[policy]\nallocated_from = "first_start"\nrunning = "state"\n'
    c = CollectorProcess(
        tmp_path, kafka_bootstrap, f'listen = "127.0.0.1:{port}"', extra=policy, lifecycle_topic=lifecycle
    )
    collectors.append(c)
    query = f"/v1/usage?start={start}&end={start + HOUR}&resource={VM1}"

    def records() -> dict[int, int]:
        try:
            return {r["usage_type"]: r["quantity"] for r in get(port, query)["usage"]}
        except OSError:
            return {}

    # RUNNING 0:05-0:20 by the state events (the default: 0:01-0:20; usage events: 0:01-0:30);
    # ALLOCATED from the first start, 0:05, to the end of the window (the default: from 0:00).
    wait_for(lambda: records() == {1: 15 * MIN, 2: 55 * MIN}, 60, f"the policy's records; log:\n{c.log()}")
    assert "policy allocated_from=first_start allocated_until=destroy running=state" in c.log()
    c.stop()

    # The same store under the default policy: put in force over the whole store at start.
    c = CollectorProcess(tmp_path, kafka_bootstrap, f'listen = "127.0.0.1:{port}"', lifecycle_topic=lifecycle)
    collectors.append(c)
    wait_for(lambda: records() == {1: 19 * MIN, 2: HOUR}, 60, f"the default's records; log:\n{c.log()}")
    changed = "billing policy changed since the last start: records so far follow allocated_from=first_start"
    assert changed in c.log()


@pytest.mark.parametrize(
    ("section", "says"),
    [
        ('running = "both"', "policy.running: 'both' is not one of ['usage_and_state', 'usage', 'state']"),
        ('allocated_from = "boot"', "policy.allocated_from: 'boot' is not one of ['create', 'first_start']"),
        ('ip_until = "never"', "policy.ip_until: 'never' is not one of ['release']"),
        ('runing = "state"', "policy.runing: unknown key (allowed here: allocated_from, allocated_until,"),
    ],
)
def test_a_policy_it_does_not_know_stops_the_collector_at_start(
    kafka_bootstrap: str,
    tmp_path: Path,
    collectors: list[CollectorProcess],  # noqa: F811
    section: str,
    says: str,
) -> None:
    port = free_port()
    c = CollectorProcess(
        tmp_path, kafka_bootstrap, f'listen = "127.0.0.1:{port}"', extra=f"[policy]\n{section}\n"
    )
    collectors.append(c)
    assert c.proc.wait(30) != 0
    assert says in c.log()
    assert "API on" not in c.log()
