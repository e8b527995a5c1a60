"""The netlink stats dump against the real kernel: the same counters as /proc/net/dev, link by
link, in a namespace of bridges and veths that carried traffic (IPv6 off: nothing moves between
the two reads)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator

import pytest

from kvmeter.agent.counters import KernelTable, parse_proc_net_dev
from kvmeter.agent.linkstats import NetlinkStats
from tests.integration.test_topology_netns import inside, ip, quiet

pytestmark = pytest.mark.netns

VETHS = 40  # over one reply of the dump (about 130 links per 32 KiB)


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"kvm-stats-{os.getpid()}"
    ip("netns", "add", name)
    try:
        quiet(name)
        lines = ["link add br0 type bridge mcast_snooping 0", "link set br0 up", "link set lo up"]
        for i in range(VETHS):
            lines += [
                f"link add vnet{i} type veth peer name peer{i}",
                f"link set vnet{i} master br0",
                f"link set vnet{i} up",
                f"link set peer{i} up",
            ]
        subprocess.run(["ip", "-n", name, "-batch", "-"], input="\n".join(lines), text=True, check=True)
        ip("-n", name, "addr", "add", "192.0.2.1/24", "dev", "br0")
        with inside(name), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            # broadcasts out of the bridge to every port: counters that are not all zero
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            for _ in range(3):
                udp.sendto(b"x" * 100, ("192.0.2.255", 9))
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_the_dump_holds_every_link_with_proc_net_devs_counters(netns: str) -> None:
    links = {link["ifindex"]: link["ifname"] for link in json.loads(ip("-n", netns, "-j", "link", "show"))}
    with inside(netns):
        reader = NetlinkStats()
        try:
            dumped = reader.read()
            again = reader.read()  # the socket serves the next poll's dump too
        finally:
            reader.close()
        with open("/proc/net/dev", "rb") as f:
            text = f.read()
    by_name = {
        links[index]: stats
        for index, *stats in zip(
            dumped.ifindexes,
            dumped.rx_bytes,
            dumped.rx_packets,
            dumped.tx_bytes,
            dumped.tx_packets,
            strict=True,
        )
    }
    assert sorted(dumped.ifindexes) == sorted(links)
    assert {name: tuple(stats) for name, stats in by_name.items()} == parse_proc_net_dev(text)
    assert again == dumped
    assert sum(dumped.tx_bytes) > 0


def test_the_agents_table_is_the_dump_by_default(netns: str) -> None:
    with inside(netns):
        table = KernelTable()
        try:
            read = table.read()
        finally:
            table.close()
    assert read.names == []
    assert read.ifindexes is not None
    assert len(read.ifindexes) == 2 * VETHS + 2  # br0, lo
