"""The printed part of the whole-process section (bench.agent_process) and its goals."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

STATE_LABELS = {
    "steady": "steady, broker up",
    "broker_down": "broker unreachable",
    "storm": "VM storm (a tenth of the taps replaced, back to back)",
}
THREADS = ("main (poll loop)", "librdkafka", "other threads")


def _range(spread: dict[str, float], fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(spread['median'])} ({fmt.format(spread['min'])}-{fmt.format(spread['max'])})"


def section(proc: dict[str, Any], table: Callable[..., str]) -> str:
    if "error" in proc:
        return f"8. The whole agent process: FAILED: {proc['error']}"
    text = []
    st = proc.get("states")
    if st:
        rows = []
        for key, label in STATE_LABELS.items():
            s = st[key]
            by_thread = [
                sum(r["cpu_per_poll_by_thread_s"].get(t, 0.0) for r in s["runs"]) / len(s["runs"]) * 1000
                for t in THREADS
            ]
            if key == "broker_down":
                label += f" ({s['outage_s']:.0f} s)"
            rows.append(
                [
                    label,
                    _range(s["cpu_per_poll_ms"]),
                    _range(s["process_to_floor"]) + "x",
                    _range(s["process_to_cadence_floor"]) + "x",
                    _range(s["agent_poll_to_floor"]) + "x",
                    " / ".join(f"{v:.1f}" for v in by_thread),
                    f"{s['log_lines_per_poll']['median']:.2f}",
                ]
            )
        down, storm = st["broker_down"], st["storm"]
        took = _range(storm["replacement_s"]) if storm["replacement_s"] else "-"
        text += [
            f"8. The whole agent process (`kvmeter agent`, {st['n']} interfaces, poll every "
            f"{st['interval_s']:g} s): CPU per poll of all threads (/proc/<pid>/stat over "
            f"{st['polls_per_window']} polls), median (range) of {st['repeats']} windows; the floor and "
            "Agent.poll measured between them",
            table(
                [
                    "state",
                    "process ms/poll",
                    "process vs floor",
                    "process vs floor at its cadence",
                    "Agent.poll vs floor",
                    "main / librdkafka / other ms",
                    "log lines/poll",
                ],
                rows,
            ),
            f"   floor at the poll's cadence (a raw read every {st['interval_s']:g} s, in a process "
            f"of its own, before and after the agent ran): {_range(st['cadence_floor_ms'], '{:.2f}')} "
            "ms; the probe's floor is read between other reads of the same table, its caches warm",
            f"   broker unreachable: {down['to_steady']:.2f}x the steady cost; "
            f"{down['pending_batches']} batches ({down['pending_bytes']:,} bytes) spooled, drained "
            f"{down['drained_s']:.0f} s after it came back ({down['pending_after_drain']} left); "
            f"resident {down['rss_before_mb']:.1f} MB before the outage, "
            f"{down['rss_end_mb']:.1f} MB at its end",
            f"   VM storm: {_range(storm['taps_replaced_per_poll'], '{:.0f}')} taps replaced a poll "
            f"({storm['taps_per_replacement']} at a time, a replacement taking {took} s); Agent.poll "
            "between a tenth of the taps deleted and made again (their domains still running) "
            f"{_range(storm['agent_poll_gone_first_to_floor'])}x the floor",
        ]
    rows = []
    for m in proc["memory"]:
        off, on = m["metrics_off"], m["metrics_on"]
        rows.append(
            [
                f"{m['n']:>6} interfaces",
                f"{off['rss_peak_mb']:.1f} / {off['rss_peak_without_test_driver_mb']:.1f}",
                f"{on['rss_peak_mb']:.1f} / {on['rss_peak_without_test_driver_mb']:.1f}",
                f"{m['libvirt_test_driver_mb']:.1f}",
            ]
        )
    text += [
        "   Resident memory, peak MB (whole / less libvirt's in-process test driver):",
        table(["   size", "metrics off", "metrics on", "test driver MB"], rows),
    ]
    return "\n".join(text)


def goals(proc: dict[str, Any]) -> list[str]:
    out = []
    st = proc.get("states")
    if st:
        steady = st["steady"]["process_to_floor"]["median"]
        out.append(
            f"agent process, steady, {st['n']} interfaces: <= 3x the floor per poll: {steady:.1f}x -> "
            f"{_verdict(steady <= 3)}"
        )
        cadence = st["steady"]["process_to_cadence_floor"]["median"]
        out.append(
            "  the same against the floor read at the poll's cadence (not the issue's floor): "
            f"{cadence:.1f}x -> {_verdict(cadence <= 3)}"
        )
        down = st["broker_down"]["to_steady"]
        out.append(
            f"agent process, broker unreachable: <= 10% above steady: {(down - 1) * 100:+.0f}% -> "
            f"{_verdict(down <= 1.10)}"
        )
        storm = st["storm"]["agent_poll_to_floor"]["median"]
        out.append(
            "agent poll right after a VM storm's link events <= 3x the floor: "
            f"{storm:.1f}x -> {_verdict(storm <= 3)}"
        )
    for m in proc.get("memory", []):
        if m["n"] == 10_000:
            rss = m["metrics_on"]["rss_peak_without_test_driver_mb"]
            out.append(
                f"agent process memory < 60 MB at 10,000 interfaces (metrics on, less the test driver): "
                f"{rss:.1f} MB -> {_verdict(rss < 60)}"
            )
    return out


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"
