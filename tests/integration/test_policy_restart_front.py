"""A restart under a changed [policy] puts it in force over the whole store, as SIGHUP does:
`kvmeter collector` (CloudStack's events by its webhook input) and `kvmeter run --all-in-one`
(from its events file) started from a TOML file, stopped, the file's [policy] changed, started
again: every resource is recomputed under the new policy from all its events, final windows
adjusted (the net equals what the new policy gives for the same events), and the change is
recorded and logged. Started once more unchanged, nothing is recomputed."""

from __future__ import annotations

from pathlib import Path

from kvmeter.collector.model import ALLOCATED_VM, RUNNING_VM
from tests.collector_support import MIN, wait_for
from tests.harness.ports import wait_for_port
from tests.integration.test_policy_reload_front import (
    DEFAULT,
    allinone_config,
    collector_billing_vm1,
    net,
    policies,
    start_allinone,
    stop_allinone,
)

FIRST_START = {RUNNING_VM: 5 * MIN, ALLOCATED_VM: 10 * MIN}  # the 5 final windows before it: 0
CHANGED = "billing policy changed since the last start: records so far follow allocated_from=create"


def test_a_collector_restarted_under_a_changed_policy_recomputes_the_whole_store(tmp_path: Path) -> None:
    with collector_billing_vm1(tmp_path) as (proc, db):
        assert proc.terminate() == 0, proc.logs()
        proc.write('[policy]\nallocated_from = "first_start"\n')
        proc.start()
        wait_for_port("127.0.0.1", proc.port, 60, "the collector's API")
        assert net(db) == FIRST_START, proc.logs()  # before the API was up: at start
        assert CHANGED in proc.logs(20_000)
        assert "allocated_from=first_start" in policies(db)[-1]
        assert len(policies(db)) == 2
        assert proc.terminate() == 0, proc.logs()

        proc.start()  # the same policy again: nothing to recompute, nothing recorded
        wait_for_port("127.0.0.1", proc.port, 60, "the collector's API")
        assert net(db) == FIRST_START
        assert len(policies(db)) == 2
        assert proc.logs(20_000).count("billing policy changed") == 1, proc.logs()
        assert proc.terminate() == 0, proc.logs()


def test_the_all_in_one_restarted_under_a_changed_policy_recomputes_the_whole_store(tmp_path: Path) -> None:
    config, base, db = allinone_config(tmp_path)
    log = tmp_path / "allinone.log"
    proc = start_allinone(config, log)
    try:
        wait_for(lambda: net(db) == DEFAULT, 60, "records", log.read_text)
    finally:
        stop_allinone(proc, log)
    config.write_text(base + '[policy]\nallocated_from = "first_start"\n')
    proc = start_allinone(config, log)
    try:
        wait_for(lambda: log.read_text().count("agent started") == 2, 60, "the second start", log.read_text)
        assert CHANGED in log.read_text()  # before the agent started
        assert net(db) == FIRST_START, log.read_text()
        assert "allocated_from=first_start" in policies(db)[-1]
    finally:
        stop_allinone(proc, log)
