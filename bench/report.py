"""The printed table of a bench run, from the results dictionary (what results.json holds)."""

from __future__ import annotations

from typing import Any

from bench import peers_report, process_report

METHOD_LABELS = {
    "floor": "raw read of /proc/net/dev (floor)",
    "kvmeter": "kvmeter agent poll (daemon)",
    "kvmeter_core": "kvmeter core stages only",
    "psutil": "psutil.net_io_counters(pernic)",
    "pyroute2": "pyroute2 full link dump",
    "per_nic_scan": "per-NIC table scan (libvirt way)",
}


def _num(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append(
            "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        )
    return "\n".join(out)


def agent_section(agent: dict[str, Any]) -> str:
    if "error" in agent:
        return f"1. Agent poll cost: FAILED: {agent['error']}"
    interval = agent["poll_interval_s"]
    rows = []
    for size in agent["sizes"]:
        for name, m in size["methods"].items():
            rows.append(
                [
                    f"{size['n']:>6} {METHOD_LABELS.get(name, name)}",
                    _num(m["us_per_interface"], 2),
                    _num(m["ratio_to_floor"], 1) + "x",
                    f"{m['cpu_share_at_interval'] * 100:.3f}%",
                ]
            )
    text = [
        f"1. Agent poll cost (CPU time per poll, median; share of one core polling every {interval:g} s)",
        _table(["interfaces / method", "us/interface", "vs floor", f"CPU @{interval:g}s"], rows),
        "",
        "   Real agent process (as `kvmeter agent` builds it: libvirt test driver, netlink, spool, Kafka),\n"
        "   Agent.run() with traffic on every tap:",
    ]
    loop_rows = []
    failures: list[str] = []
    for size in agent["sizes"]:
        loop = size["agent_loop"]
        if "error" in loop:
            failures.append(
                f"   {size['n']} interfaces: the agent process FAILED: {_last_line(loop['error'])}"
            )
            continue
        loop_rows.append(
            [
                f"{size['n']:>6} interfaces",
                _num(loop["rss_peak_mb"], 1),
                _num(loop["rss_peak_without_test_driver_mb"], 1),
                f"{loop['poll_cpu_s'] * 1000:.1f} / {loop['poll_cpu_mean_s'] * 1000:.1f}",
                f"{loop['cpu_share_at_interval'] * 100:.3f}%",
                str(loop["measures_per_poll"]),
                str(loop["batches_per_poll"]),
            ]
        )
    text.append(
        _table(
            [
                "   size",
                "RSS peak MB",
                "w/o test driver",
                "CPU ms/poll",
                f"CPU @{interval:g}s",
                "measures/poll",
                "batches/poll",
            ],
            loop_rows,
        )
    )
    text.extend(failures)
    stages = [
        f"{s['n']}: "
        + ", ".join(f"{k} {v:.2f}" for k, v in s["kvmeter_core_stages_us_per_interface"].items())
        for s in agent["sizes"]
    ]
    text.append("   kvmeter core stages, us/interface: " + "; ".join(stages))
    return "\n".join(text)


def _rates_by_store(
    baseline: tuple[str, float], path: str, stores: dict[str, Any], keys: tuple[str, str, str]
) -> list[list[str]]:
    """A baseline row, then one row per store: rate, ratio to the baseline, rate per CPU second."""
    rate, ratio, per_cpu = keys
    rows = [[baseline[0], _num(baseline[1], 0), "1.00x", ""]]
    for name, run in stores.items():
        rows.append([f"{path}, {name}", _num(run[rate], 0), f"{run[ratio]:.2f}x", _num(run[per_cpu] or 0, 0)])
    return rows


def collector_section(col: dict[str, Any]) -> str:
    if "error" in col:
        return f"2. Collector throughput: FAILED: {col['error']}"
    rows = _rates_by_store(
        ("decode_batch only (same batches)", col["decode_measures_per_s"]),
        "broker -> committed usage",
        col["stores"],
        ("measures_per_s", "ratio_to_decode", "measures_per_cpu_s"),
    )
    head = (
        f"2. Collector throughput, one replica ({col['batches']} batches, {col['measures']} measures of "
        f"{col['hosts']} hosts x {col['nics_per_host']} NICs; lifecycle applied first, not timed)"
    )
    return head + "\n" + _table(["path", "measures/s", "vs decode", "measures/CPU-s"], rows)


def freshness_section(fresh: dict[str, Any]) -> str:
    if "error" in fresh:
        return f"3. Freshness: FAILED: {fresh['error']}"
    rows = [
        [
            r.get("pipeline", r.get("mode", "")),
            f"{r['poll_interval_s']:g}",
            _num(r["p50_s"], 2),
            _num(r["p99_s"], 2),
            str(r["samples"]),
        ]
        for r in fresh["runs"]
    ]
    return "3. Freshness: bytes crossing a VM's veth -> visible in the usage API\n" + _table(
        ["pipeline", "poll interval s", "p50 s", "p99 s", "samples"], rows
    )


def scale_section(scale: dict[str, Any]) -> str:
    if "error" in scale:
        return f"4. Scale model: FAILED: {scale['error']}"
    rows = [
        [f"{r} replica(s), {scale['store']}", _num(run["measures_per_s"], 0), f"{run['headroom']:.2f}x"]
        for r, run in scale["replicas"].items()
    ]
    head = (
        f"4. Scale model: {scale['target_hosts']:,} hosts x {scale['target_nics_per_host']} NICs every "
        f"{scale['interval_s']:g} s needs {_num(scale['required_measures_per_s'], 0)} measures/s "
        f"(played: {scale['played_hosts']} agents x {scale['nics_per_host']} NICs x {scale['polls']} polls)"
    )
    return head + "\n" + _table(["collector", "measures/s", "headroom"], rows)


def lifecycle_section(life: dict[str, Any]) -> str:
    if "error" in life:
        return f"5. Lifecycle load: FAILED: {life['error']}"
    rows = _rates_by_store(
        ("cloudstack.parse_event only (same lines)", life["parse_events_per_s"]),
        "ingest --events -> committed usage",
        life["stores"],
        ("events_per_s", "ratio_to_parse", "events_per_cpu_s"),
    )
    head = (
        f"5. Lifecycle load ({life['events']} CloudStack events of {life['vms']} VMs and their IPs into "
        "hourly time records, chunks of 500)"
    )
    return head + "\n" + _table(["path", "events/s", "vs parse", "events/CPU-s"], rows)


def memory_section(mem: dict[str, Any]) -> str:
    if "error" in mem:
        return f"5b. Collector memory: FAILED: {mem['error']}"
    rows = []
    for name, label in (("keep", "every resource kept (baseline)"), ("evict", "closed ones leave memory")):
        run = mem[name]
        rows.append(
            [
                label,
                f"{run['resources_held']:,} (most {run['resources_held_most']:,})",
                f"{run['events_held']:,}",
                f"{run['hints_held']:,} (most {run['hints_held_most']:,})",
                f"{run['witness_held']:,} (most {run['witness_held_most']:,})",
                f"{_num(run['rss_start_mb'])} -> {_num(run['rss_end_mb'])}",
                _num(run["batch_measures_per_s"]),
            ]
        )
    rows.append(
        [
            "evicting / baseline",
            f"{mem['held_ratio']:.3f}",
            "",
            f"{mem['hints_held_ratio']:.3f}",
            f"{mem['witness_held_ratio']:.3f}",
            f"growth {mem['rss_growth_ratio']:.2f}x",
            f"{mem['batch_rate_ratio']:.2f}x",
        ]
    )
    head = (
        f"5b. Collector memory after {mem['days']} days of lifecycle of {mem['vms']:,} VMs and their IPs "
        f"({mem['events']:,} events, a day at a time, each day one measure per live VM with its "
        "inventory, tick daily; the same usage and witness either way)"
    )
    columns = ["replica", "resources held", "events held", "owner hints held", "witness held",
               "RSS MB start -> end", "batch measures/s"]  # fmt: skip
    return head + "\n" + _table(columns, rows)


def retention_section(ret: dict[str, Any]) -> str:
    if "error" in ret:
        return f"5c. Retention: FAILED: {ret['error']}"
    rows = []
    for name, run in ret["stores"].items():
        for label, key in (("no pass (baseline)", "baseline"), ("during a prune pass", "during_prune")):
            lat = run[key]
            rows.append(
                [
                    f"{name}, {label}",
                    str(lat["chunks"]),
                    _num(lat["p50_ms"]),
                    _num(lat["p95_ms"]),
                    _num(lat["max_ms"]),
                ]
            )
        rows.append(
            [
                f"{name}, pass: {run['rows_pruned']:,} rows in {_num(run['prune_seconds'])} s "
                f"({run['rows_per_s']:,.0f} rows/s)",
                "",
                "",
                f"{run['p95_ratio']:.1f}x",
                f"{run['max_ratio']:.1f}x",
            ]
        )
    head = (
        f"5c. Retention: ingestion (chunks of 10 batches x 50 measures) beside a prune pass deleting the "
        f"events of {ret['vms']:,} closed VMs and {ret['quarantined']:,} quarantined measures, "
        f"{ret['batch_rows']:,} rows per transaction"
    )
    return head + "\n" + _table(["store", "chunks", "p50 ms", "p95 ms", "max ms"], rows)


def api_section(api: dict[str, Any]) -> str:
    if "error" in api:
        return f"6. listUsageRecords: FAILED: {api['error']}"
    rows = []
    for name, run in api["stores"].items():
        for who in ("operator", "account"):
            lat = run[who]
            ratio = f"{lat['ratio_to_raw_sql']:.1f}x"
            times = [_num(lat[k]) for k in ("api_ms", "raw_sql_ms", "api_max_ms", "random_page_ms")]
            rows.append([f"{name}, {who}", times[0], times[1], ratio, times[2], times[3]])
        paging = run["paging"]
        memory = f"{_num(paging['rss_before_mb'])} -> {_num(paging['rss_peak_mb'])} MB"
        rows.append([f"{name}, API RSS, {paging['clients']} clients paging", memory, "", "", "", ""])
    head = (
        f"6. listUsageRecords over {api['records']:,} records (pages of {api['page']} over a month, in "
        "order as CloudStack clients page; raw SQL: the same page by the index)"
    )
    return (
        head
        + "\n"
        + _table(["store, caller", "API ms", "raw SQL ms", "ratio", "max ms", "random page ms"], rows)
    )


def billing_section(bill: dict[str, Any]) -> str:
    if "error" in bill:
        return f"7. Rating: FAILED: {bill['error']}"
    tp, costs = bill["throughput"], bill["costs"]
    rows = [
        ["no rating (baseline)", f"{tp['without']['measures_per_s']:,.0f}", "", ""],
        [
            f"one account's month rated every {tp['rate_interval_s']} s",
            f"{tp['with']['measures_per_s']:,.0f}",
            f"{tp['with']['rating_passes']}",
            _num(tp["with"]["rating_pass_ms"]),
        ],
        ["with / without", f"{tp['ratio']:.3f}", "", ""],
    ]
    head = (
        f"7. Rating: the collector applying {tp['measures']:,} measures into SQLite while costs are "
        f"rated in its process ({tp['rated_accounts']} accounts with a month of hourly records each)"
    )
    costs_rows = [["raw SQL read of the same rows (baseline)", _num(costs["raw_sql_ms"]), "1", ""]]
    for name, what in (
        ("first", "asked first (the whole month rated)"),
        ("unchanged", "asked again, unchanged"),
        ("growing", "asked again as its last window grows"),
    ):
        if name in costs:
            run = costs[name]
            costs_rows.append([what, _num(run["median_ms"]), f"{run['ratio']:.1f}", _num(run["max_ms"])])
    tail = (
        f"/v1/costs, one account's month ({costs['account_records']:,} hourly records among "
        f"{costs['records']:,}), medians:\n" + _table(["request", "ms", "x baseline", "max ms"], costs_rows)
    )
    out = head + "\n" + _table(["collector", "measures/s", "ratings", "rating ms"], rows) + "\n" + tail
    bal = bill.get("balances")
    if bal:
        bal_rows = [["a new book: every month rated (baseline)", _num(bal["baseline_ms"]), "1"]]
        for name, what in (
            ("unchanged", "kept: nothing changed"),
            ("growing", "kept: a current month grows"),
        ):
            bal_rows.append([what, _num(bal[name]["median_ms"]), f"{bal[name]['ratio']:.3f}"])
        out += (
            f"\nBalance check, {bal['accounts']} accounts with credits, {bal['months']} months of hourly "
            f"records each ({bal['records']:,}), medians:\n"
            + _table(["evaluation", "ms", "x baseline"], bal_rows)
        )
    return out


def goals(results: dict[str, Any]) -> list[str]:
    """The issues' performance goals, each with the measured figure."""
    out = []
    agent = results.get("agent", {})
    for size in agent.get("sizes", []):
        if size["n"] == 2000:
            ratio = size["methods"]["kvmeter"]["ratio_to_floor"]
            rss = size["agent_loop"].get("rss_peak_without_test_driver_mb", float("inf"))
            out.append(
                f"agent poll for 2,000 interfaces <= 3x the raw read: {ratio:.1f}x -> {_verdict(ratio <= 3)}"
            )
            out.append(
                f"agent resident memory < 60 MB (2,000 interfaces, less libvirt's in-process test driver): "
                f"{rss:.1f} MB -> {_verdict(rss < 60)}"
            )
    col = results.get("collector", {})
    for name, run in col.get("stores", {}).items():
        ok = run["ratio_to_decode"] >= 0.3 and run["measures_per_s"] >= 200_000
        out.append(
            f"collector {name}: >= 30% of decode and >= 200,000 measures/s: "
            f"{run['ratio_to_decode'] * 100:.0f}%, {run['measures_per_s']:,.0f}/s -> {_verdict(ok)}"
        )
    api = results.get("api", {})
    for name, run in api.get("stores", {}).items():
        worst = max(run["operator"]["api_ms"], run["account"]["api_ms"])
        out.append(
            f"listUsageRecords {name}: a page of 500 over {api['records']:,} records < 50 ms at the median: "
            f"{worst:.1f} ms -> {_verdict(worst < 50)}"
        )
        paging = run["paging"]
        grown = paging["rss_peak_mb"] - paging["rss_before_mb"]
        out.append(
            f"listUsageRecords {name}: API memory flat while {paging['clients']} clients page through a "
            f"month (< 20 MB growth): +{grown:.1f} MB -> {_verdict(grown < 20)}"
        )
    bill = results.get("billing", {})
    if "throughput" in bill:
        cost = 1 - bill["throughput"]["ratio"]
        out.append(
            f"rating costs <= 10% of the collector's throughput: {cost * 100:.1f}% "
            f"-> {_verdict(cost <= 0.10)}"
        )
        median = bill["costs"]["median_ms"]
        out.append(
            f"/v1/costs for one account over a month of hourly records < 50 ms (the open window "
            f"growing between requests): {median:.1f} ms -> {_verdict(median < 50)}"
        )
    out += process_report.goals(results.get("process", {}))
    out += peers_report.goals(results.get("peers", {}))
    return out


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _store_scale() -> Any:
    from bench import store_scale_bench  # the store's code: loaded only when its sections ran

    return store_scale_bench


def render(results: dict[str, Any]) -> str:
    meta = results["meta"]
    parts = [
        f"kvmeter bench {'(quick) ' if meta['quick'] else ''}at {meta['started']} on {meta['cpus']} CPUs, "
        f"commit {meta['commit']}, load {meta['loadavg_start']:.2f} -> {meta['loadavg_end']:.2f}",
    ]
    sections = (
        ("agent", agent_section),
        ("collector", collector_section),
        ("freshness", freshness_section),
        ("scale", scale_section),
        ("lifecycle", lifecycle_section),
        ("memory", memory_section),
        ("retention", retention_section),
        ("api", api_section),
        ("billing", billing_section),
        ("peers", lambda peers: peers_report.section(peers, _table, _num)),
        ("process", lambda proc: process_report.section(proc, _table)),
        ("migration24", lambda mig: _store_scale().migration_section(mig, _table)),
        ("claim", lambda cl: _store_scale().claim_section(cl, _table)),
    )
    for key, fn in sections:
        if key in results:
            parts.append(fn(results[key]))
    lines = goals(results)
    if lines:
        title = "Goals (quick run: sizes too small to judge them):" if meta["quick"] else "Goals:"
        parts.append(title + "\n" + "\n".join("  " + line for line in lines))
    return "\n\n".join(parts) + "\n"
