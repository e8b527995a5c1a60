"""The billing policy in the all-in-one, through the front door: `kvmeter run --all-in-one
--config FILE` with a [policy] section bills RUNNING and ALLOCATED from the events that policy
names (from its events file), and a value it does not know stops it at start."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kvmeter.collector.model import ALLOCATED_VM, RUNNING_VM
from kvmeter.collector.store import Store
from kvmeter.pipeline.sim.simevents import EventBus
from tests.collector_support import MIN, VM1, cs_time
from tests.harness.netns import Host
from tests.harness.processes import KVMETER, AllInOneProcess

ACCOUNT = "acc00000-0000-4000-8000-0000000000b1"
WINDOW = 60_000  # the harness's window_seconds = 60


def state_event(old: str, new: str, at_ms: int) -> bytes:
    return (
        f'{{"resource":"VirtualMachine","id":"{VM1}","old-state":"{old}","new-state":"{new}",'
        f'"status":"postStateTransitionEvent","eventDateTime":"{cs_time(at_ms)}"}}'
    ).encode()


@pytest.mark.netns
@pytest.mark.libvirt
def test_the_all_in_one_bills_by_its_policy(netns_host: Callable[..., Host], tmp_path: Path) -> None:
    host = netns_host("pol")
    policy = '[policy]\nallocated_from = "first_start"\nrunning = "state"\n'
    proc = AllInOneProcess(host, tmp_path, poll=1.0, extra=policy)
    at = (int(time.time() * 1000) // WINDOW - 12) * WINDOW  # whole minutes, all in the past
    bus = EventBus()
    proc.events.write_bytes(
        b"\n".join([
            bus.vm("VM.CREATE", VM1, ACCOUNT, at)[1],
            bus.vm("VM.START", VM1, ACCOUNT, at + MIN)[1],
            state_event("Starting", "Running", at + 2 * MIN),  # the state event of the start, late
            state_event("Running", "Stopped", at + 5 * MIN),  # a power-off ...
            bus.vm("VM.STOP", VM1, ACCOUNT, at + 6 * MIN)[1],  # ... told late by its usage event
        ]) + b"\n"
    )  # fmt: skip
    host.write_libvirt_xml(proc.libvirt_xml)
    proc.start()
    try:
        proc.wait_polled()
        time.sleep(2)  # the events file read, a tick
        assert proc.terminate() == 0, proc.logs()
    finally:
        proc.stop()
    store = Store(proc.db)
    try:
        rows = store.usage(at - WINDOW, at + 20 * MIN, resource=VM1)
    finally:
        store.close()
    running = {r.key.window_start_ms - at: r.quantity for r in rows if r.key.usage_type == RUNNING_VM}
    allocated = [r.key.window_start_ms - at for r in rows if r.key.usage_type == ALLOCATED_VM and r.quantity]
    # RUNNING 0:02-0:05 by the state events (the default: 0:01-0:05; usage events: 0:01-0:06);
    # ALLOCATED from the first start at 0:02 on (the default: from the create at 0:00).
    assert running == {2 * MIN: MIN, 3 * MIN: MIN, 4 * MIN: MIN}, proc.logs()
    assert min(allocated) == 2 * MIN, proc.logs()
    assert all(r.key.account == ACCOUNT for r in rows)


def test_a_policy_it_does_not_know_stops_the_all_in_one_at_start(tmp_path: Path) -> None:
    config = tmp_path / "allinone.toml"
    config.write_text(f'[store]\nurl = "sqlite:///{tmp_path}/x.db"\n[policy]\nallocated_until = "delete"\n')
    proc = subprocess.run(
        [*KVMETER, "run", "--all-in-one", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "policy.allocated_until: 'delete' is not one of ['destroy', 'expunge']" in proc.stderr
    assert not (tmp_path / "x.db").exists()
