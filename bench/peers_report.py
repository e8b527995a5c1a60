"""The peers section of the printed bench table (see bench.peers) and its goal."""

from __future__ import annotations

from typing import Any

LABELS = {
    "floor": "raw read of /proc/net/dev (floor)",
    "kvmeter": "kvmeter agent poll (daemon)",
    "prometheus-node-exporter": "node_exporter, netdev (a scrape)",
    "collectd": "collectd, interface plugin",
    "floor (libvirt host)": "raw read of /proc/net/dev (floor)",
    "prometheus-libvirt-exporter": "libvirt exporter + libvirtd (a scrape)",
}


def section(peers: dict[str, Any], table: Any, num: Any) -> str:
    if "error" in peers:
        return f"7. Real peers: FAILED: {peers['error']}"
    rows, notes = [], []
    for row in peers["rows"]:
        label = f"{row['n']:>6} {LABELS.get(row['peer'], row['peer'])}"
        if "error" in row:
            rows.append([label, "FAILED", "", "", ""])
            notes.append(f"   {row['peer']} at {row['n']}: {row['error'].strip().splitlines()[-1]}")
            continue
        rss = row.get("rss_mb")
        rows.append(
            [
                label,
                num(row["total_cpu_s_per_collection"] * 1e3, 2),
                num(row["us_per_interface"], 2),
                num(row["ratio_to_floor"], 1) + "x",
                "" if rss is None else num(rss, 1),
            ]
        )
    reports = {row["peer"]: row["reports"] for row in peers["rows"] if "reports" in row}
    text = [
        "7. Real peers on the same interfaces (CPU time of that process per collection; the libvirt\n"
        "   exporter's row adds the libvirtd it asks, over paused real domains; kvmeter's memory is in 1.)",
        table(["interfaces / program", "ms/collection", "us/interface", "vs floor", "RSS MB"], rows),
        *notes,
        "   What each reports:",
        *(f"   - {LABELS.get(peer, peer)}: {what}" for peer, what in reports.items()),
    ]
    return "\n".join(text)


def goals(peers: dict[str, Any]) -> list[str]:
    """kvmeter's CPU per interface below every peer's at each size both were measured at."""
    out = []
    by_size: dict[int, dict[str, float]] = {}
    for row in peers.get("rows", []):
        if "error" not in row:
            by_size.setdefault(row["n"], {})[row["peer"]] = row["us_per_interface"]
    for n, figures in sorted(by_size.items()):
        if "kvmeter" not in figures:
            continue
        others = {p: us for p, us in figures.items() if p != "kvmeter" and not p.startswith("floor")}
        if not others:
            continue
        cheapest = min(others, key=lambda p: others[p])
        ok = figures["kvmeter"] < others[cheapest]
        out.append(
            f"kvmeter's poll below every peer's CPU per interface at {n:,}: {figures['kvmeter']:.2f} us vs "
            f"{LABELS.get(cheapest, cheapest)} {others[cheapest]:.2f} us -> {'met' if ok else 'NOT met'}"
        )
    return out
