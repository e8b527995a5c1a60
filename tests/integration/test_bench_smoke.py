"""The benchmark code runs end to end on tiny sizes (so `make bench` does not rot): the agent poll
paths over real veth taps with traffic, the collector's drain from the real broker with its
conservation check, freshness through `kvmeter run --all-in-one`, the lifecycle load on both
stores with its own checks (every event stored, the same usage in both stores), and the report."""

from __future__ import annotations

from pathlib import Path
from statistics import median

import pytest
from bench import (
    agent_bench,
    agent_process,
    api_bench,
    billing_bench,
    collector_bench,
    freshness,
    lifecycle_bench,
    memory_bench,
    report,
    retention_bench,
    store_scale_bench,
)

NICS = 6
META = {"quick": True, "started": "now", "cpus": 2, "commit": "x", "loadavg_start": 0.0, "loadavg_end": 0.0}


@pytest.mark.netns
@pytest.mark.broker
def test_bench_sections_run_on_tiny_sizes(kafka_bootstrap: str) -> None:
    logs: list[str] = []
    agent = agent_bench.run([NICS], quick=True, log=logs.append)
    (size,) = agent["sizes"]
    # every tap moved bytes both ways between polls: one measure per direction per interface
    assert size["measures_per_poll"] == 2 * NICS
    assert size["agent_loop"]["measures_per_poll"] == 2 * NICS
    assert size["agent_loop"]["batches_delivered"] >= 2  # the loop published to the broker
    assert set(size["methods"]) == {"floor", "kvmeter", "kvmeter_core", "psutil", "pyroute2", "per_nic_scan"}
    assert size["methods"]["floor"]["ratio_to_floor"] == 1.0
    assert size["agent_loop"]["rss_peak_mb"] > 10

    # drain() raises unless the store holds exactly the bytes produced
    collector = collector_bench.throughput(kafka_bootstrap, None, hosts=2, nics=4, polls=2, log=logs.append)
    run = collector["stores"]["sqlite"]
    assert run["measures"] == 2 * 4 * 2 * 2
    assert run["parked"] == 0
    assert run["store_totals"]["billed_bytes"] > 0

    fresh = freshness.run(quick=True, log=logs.append, plan=[("all-in-one", 0.5, 1)])
    (sample,) = fresh["runs"]
    assert 0 < sample["p50_s"] < 10

    text = report.render(
        {
            "meta": META,
            "agent": agent,
            "collector": collector,
            "freshness": fresh,
        }
    )
    assert "kvmeter agent poll (daemon)" in text
    assert "broker -> committed usage, sqlite" in text


@pytest.mark.netns
@pytest.mark.broker
def test_the_whole_process_section_runs_on_a_tiny_size() -> None:
    out = agent_process.run([NICS], quick=True, log=lambda _: None)
    states = out["states"]
    assert states["cadence_floor_ms"]["min"] > 0  # read as the process meets it, every interval
    cadence_floor_s = states["cadence_floor_ms"]["median"] / 1000
    for name in ("steady", "broker_down", "storm"):
        assert states[name]["floor_ms"]["median"] > 0
        against_cadence = [r["cpu_per_poll_s"] / cadence_floor_s for r in states[name]["runs"]]
        assert states[name]["process_to_cadence_floor"]["median"] == pytest.approx(median(against_cadence))
        assert all(r["cpu_per_poll_live_threads_s"] > 0 for r in states[name]["runs"])
    down = states["broker_down"]
    assert down["pending_batches"] >= 2  # the spool grew while the broker was cut off
    assert down["pending_after_drain"] <= 1  # and drained once it was back
    assert states["storm"]["storm_errors"] is None
    assert states["storm"]["runs"][0]["link_events_per_round"] > 0  # the probe polled after link events
    assert states["storm"]["taps_replaced_per_poll"]["min"] > 0  # the pace the storm reached, counted
    # and timed the poll between a storm's deletions and its new taps
    assert states["storm"]["agent_poll_gone_first_to_floor"]["median"] > 0
    (memory,) = out["memory"]
    assert memory["metrics_on"]["rss_peak_mb"] > 10
    text = report.render({"meta": META, "process": out})
    assert "The whole agent process" in text
    assert "VM storm" in text
    assert "floor at the poll's cadence" in text


@pytest.mark.libvirt
def test_the_live_benches_nics_name_their_taps(tmp_path: Path) -> None:
    """libvirt drops a defined domain's target dev named vnetN: the benches' taps are named so
    that the live agent finds each NIC's tap by name, as on a QEMU host, not by MAC."""
    import libvirt
    from bench.vethns import VethHost

    from kvmeter.agent.domxml import parse_domain_xml

    conn = libvirt.open(agent_bench.write_libvirt(tmp_path / "node.xml", 5))
    try:
        named = {nic.device for dom in conn.listAllDomains() for nic in parse_domain_xml(dom.XMLDesc()).nics}
    finally:
        conn.close()
    assert named == {VethHost.tap(i) for i in range(5)}


@pytest.mark.pg
def test_lifecycle_bench_runs_on_a_tiny_size(pg_dsn: str) -> None:
    life = lifecycle_bench.run(pg_dsn, vms=3, log=lambda _: None)
    assert life["events"] == 3 * 6
    for name in ("sqlite", "postgresql"):
        run = life["stores"][name]
        assert run["events"] == 18
        # per VM: RUNNING_VM and ALLOCATED_VM hours since the start, IP_ADDRESS hours: 6 windows back
        assert run["records"] >= 3 * 3 * 5
        assert run["events_per_s"] > 0
    text = report.render({"meta": META, "lifecycle": life})
    assert "ingest --events -> committed usage, postgresql" in text


@pytest.mark.pg
def test_api_bench_runs_on_a_tiny_size(pg_dsn: str) -> None:
    out = api_bench.run(pg_dsn, records=6000, pages=3, log=lambda _: None)
    for name in ("sqlite", "postgresql"):
        run = out["stores"][name]
        assert run["operator"]["pages"] == 3  # each page checked: 500 records, count the total
        assert run["account"]["api_ms"] > 0
        assert run["paging"]["rss_peak_mb"] >= run["paging"]["rss_before_mb"] > 10
    text = report.render({"meta": META, "api": out})
    assert "listUsageRecords over 6,000 records" in text


def test_memory_bench_runs_on_a_tiny_size() -> None:
    mem = memory_bench.run(vms=40, log=lambda _: None)  # raises if eviction changed the usage
    keep, evict = mem["keep"], mem["evict"]
    assert keep["resources_held"] == 2 * 40  # a VM and its IP each
    assert keep["resources_evicted"] == 0
    assert evict["resources_held"] + evict["resources_evicted"] == 2 * 40
    assert evict["resources_held"] < keep["resources_held"] / 2
    assert mem["held_ratio"] < 0.5
    # owner hints and witness of the VMs of the year: kept by the baseline, not by the evicting one
    assert keep["hints_held"] == 2 * keep["witness_held"] > 0
    assert evict["hints_held_most"] < keep["hints_held"] / 2
    assert evict["witness_held_most"] < keep["witness_held"] / 2
    assert mem["batch_rate_ratio"] > 0
    text = report.render({"meta": META, "memory": mem})
    assert "closed ones leave memory" in text


def test_billing_bench_runs_on_a_tiny_size(tmp_path: Path) -> None:
    throughput = billing_bench.throughput(tmp_path, hosts=2, nics=4, polls=2, rounds=1, log=lambda _: None)
    assert throughput["measures"] == 2 * 4 * 2 * 2
    assert throughput["month_records"] == billing_bench.RATED_ACCOUNTS * 5 * 30 * 24
    assert throughput["ratio"] > 0
    costs = billing_bench.costs_latency(tmp_path, requests=2, log=lambda _: None)  # raises unless priced
    assert costs["account_records"] == 3600
    assert [costs[name]["requests"] for name in ("first", "unchanged", "growing")] == [19, 2, 2]
    assert costs["raw_sql_ms"] > 0
    balances = billing_bench.balance_check(tmp_path, accounts=2, rounds=1, log=lambda _: None)
    assert (balances["months"], balances["records"]) == (4, 4 * 2 * 3600)
    assert balances["growing"]["ratio"] > 0
    text = report.render(
        {"meta": META, "billing": {"throughput": throughput, "costs": costs, "balances": balances}}
    )
    assert "7. Rating" in text
    assert "/v1/costs for one account over a month of hourly records < 50 ms" in text
    assert "asked again as its last window grows" in text
    assert "kept: a current month grows" in text


@pytest.mark.pg
def test_retention_bench_runs_on_a_tiny_size(pg_database: str) -> None:
    out = retention_bench.run(pg_database, vms=50, quarantined=600, log=lambda _: None)
    for run in out["stores"].values():  # raises inside if the pass did not delete the whole month
        assert run["rows_pruned"] == 2 * 50 + 600
        assert run["baseline"]["chunks"] == 40
        assert run["during_prune"]["chunks"] >= 1
    text = report.render({"meta": META, "retention": out})
    assert "5c. Retention" in text


@pytest.mark.pg
def test_store_scale_bench_runs_on_tiny_sizes(pg_database: str) -> None:
    mig = store_scale_bench.migration24(pg_database, [2000], log=lambda _: None)
    # raises inside if an event got a seq other than its id
    assert mig["2000"]["inserts_during"] >= 1
    claim = store_scale_bench.claim(pg_database, [300], limit=50, rounds=2, log=lambda _: None)
    for name, depths in claim["stores"].items():
        run = depths["300"]
        assert run["all pending"]["picked"] == 100  # a batch per sink
        assert run["only refused pending"]["picked"] == 3  # 1 item in 100 refused
        assert run["9 in 10 refused, only they pending"]["picked"] == 50  # the webhook's batch
        if name == "sqlite":  # PostgreSQL reads a table this small whole (hash anti join, sort)
            assert any("ix_handoff_outbox_record" in line for line in run["plan"])
            assert any("ix_handoff_outbox_webhook" in line for line in run["plan"])
    text = report.render({"meta": META, "migration24": mig, "claim": claim})
    assert "5d. Migration 24" in text
    assert "5e. Hand-off claim" in text
