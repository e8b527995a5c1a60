"""The bench's real-peers section runs end to end on a tiny size (so `make bench` does not rot):
node_exporter, collectd and the libvirt exporter (against a real libvirtd with paused domains)
each measured next to kvmeter's poll and the floor, and the report prints them."""

from __future__ import annotations

import pytest
from bench import peers, report

pytestmark = [pytest.mark.realvm, pytest.mark.netns]

META = {"quick": True, "started": "now", "cpus": 2, "commit": "x", "loadavg_start": 0.0, "loadavg_end": 0.0}


def test_peers_section_measures_every_peer_on_a_tiny_size() -> None:
    logs: list[str] = []
    result = peers.run([12], quick=True, log=logs.append)
    rows = {(row["peer"], row["n"]): row for row in result["rows"]}
    assert not [row for row in result["rows"] if "error" in row], result["rows"]
    assert set(rows) == {
        ("floor", 12),
        ("kvmeter", 12),
        ("prometheus-node-exporter", 12),
        ("collectd", 12),
        ("floor (libvirt host)", 12),
        ("prometheus-libvirt-exporter", 12),
    }
    for (peer, _n), row in rows.items():
        assert row["total_cpu_s_per_collection"] > 0, peer
        assert row["us_per_interface"] > 0, peer
    for peer in ("prometheus-node-exporter", "collectd", "prometheus-libvirt-exporter"):
        assert rows[(peer, 12)]["rss_mb"] > 1, peer
    # the exporters answered with every interface: node_exporter the taps and the rest of the
    # namespace (lo, bridges), the libvirt exporter each domain NIC
    assert rows[("prometheus-node-exporter", 12)]["interfaces_reported"] >= 12
    libvirt = rows[("prometheus-libvirt-exporter", 12)]
    assert libvirt["interfaces_reported"] == 12
    assert libvirt["domains"] == 1
    assert libvirt["libvirtd_cpu_s_per_collection"] > 0

    text = report.render({"meta": META, "peers": result})
    assert "7. Real peers on the same interfaces" in text
    assert "collectd, interface plugin" in text
    assert "kvmeter's poll below every peer's CPU per interface at 12" in text
