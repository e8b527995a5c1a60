"""Every interface's counters in one read of the kernel's table.

One read per poll, whatever the number of interfaces: libvirt's interfaceStats rescans
/proc/net/dev once per NIC (O(N²)), and pyroute2 costs ~300 µs per link. The agent reads the
table as a netlink stats dump (agent.linkstats: rows keyed by ifindex), or as /proc/net/dev's text
where the kernel has no such dump (rows keyed by name; the counter identity's ifindex then comes
from the topology's name -> ifindex map).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from kvmeter.agent.linkstats import LinkCounters, NetlinkStats
from kvmeter.agent.model import CounterKey, CounterSample, DomainInfo, NicInfo

log = logging.getLogger(__name__)

PROC_NET_DEV = "/proc/net/dev"
BOOT_ID = "/proc/sys/kernel/random/boot_id"

# (rx_bytes, rx_packets, tx_bytes, tx_packets): the order libvirt and netlink stats use
Stats = tuple[int, int, int, int]


class CounterTableError(ValueError):
    """The kernel's counter table did not have the expected shape."""


# name + 16 counters: the fields of one /proc/net/dev line
FIELDS_PER_LINE = 17


class CounterTable(NamedTuple):
    """The kernel's table as columns, in its order: the poll's columnar path gathers the metered
    rows with one C-level call per column instead of a Python step per interface. Its rows are
    named (`names`), or, read from netlink, identified by `ifindexes` (`names` then empty)."""

    names: list[str]
    rx_bytes: list[int]
    rx_packets: list[int]
    tx_bytes: list[int]
    tx_packets: list[int]
    ifindexes: list[int] | None = None

    def as_dict(self) -> dict[str, Stats]:
        """name -> (rx_bytes, rx_packets, tx_bytes, tx_packets)."""
        return dict(zip(self.names, zip(self.rx_bytes, self.rx_packets, self.tx_bytes, self.tx_packets)))


def parse_proc_net_dev(text: str | bytes) -> dict[str, Stats]:
    """name -> (rx_bytes, rx_packets, tx_bytes, tx_packets) from /proc/net/dev's text."""
    return parse_counter_table(text).as_dict()


def parse_counter_table(text: str | bytes) -> CounterTable:
    """/proc/net/dev's text as columns.

    Two header lines, then `name: rx_bytes rx_packets errs drop fifo frame compressed multicast
    tx_bytes tx_packets ...`. Old kernels print no space after the colon when rx_bytes is wide.
    """
    data = text.encode("ascii", "replace") if isinstance(text, str) else text
    first = data.find(b"\n")
    second = data.find(b"\n", first + 1) if first >= 0 else -1
    if second < 0 or b"|" not in data[:first]:
        raise CounterTableError("not a /proc/net/dev table: header missing")
    # The hot path of every poll: one split of the whole table and C-level slices, no Python
    # code per line. It holds when every line is `name:` and 16 numbers (names cannot contain
    # ':' or spaces, numbers cannot contain ':'); anything else goes to the careful parse.
    tokens = data[second + 1 :].split()
    names = tokens[0::FIELDS_PER_LINE]
    joined = b"\n".join(names) + b"\n"
    if len(tokens) == FIELDS_PER_LINE * len(names) and joined.count(b":\n") == len(names):
        decoded = joined.decode("ascii", "replace").split(":\n")
        decoded.pop()  # after the last name's ":\n"
        try:
            return CounterTable(
                decoded,
                list(map(int, tokens[1::FIELDS_PER_LINE])),
                list(map(int, tokens[2::FIELDS_PER_LINE])),
                list(map(int, tokens[9::FIELDS_PER_LINE])),
                list(map(int, tokens[10::FIELDS_PER_LINE])),
            )
        except ValueError:
            pass
    table = _parse_carefully(data.decode("ascii", "replace").splitlines())
    columns = list(zip(*table.values())) or [(), (), (), ()]
    return CounterTable(list(table), *(list(c) for c in columns))


def _parse_carefully(lines: list[str]) -> dict[str, Stats]:
    """The slow parse, for a table the fast one could not read: skips blank lines, names the
    offending line."""
    table: dict[str, Stats] = {}
    for number, line in enumerate(lines[2:], start=3):
        if not line.strip():
            continue
        name, sep, rest = line.partition(":")
        fields = rest.split()
        if not sep or len(fields) < 10:
            raise CounterTableError(f"/proc/net/dev line {number} malformed: {line!r}")
        try:
            table[name.strip()] = (int(fields[0]), int(fields[1]), int(fields[8]), int(fields[9]))
        except ValueError as exc:
            raise CounterTableError(f"/proc/net/dev line {number}: {exc}") from exc
    return table


def read_boot_id(path: str = BOOT_ID) -> str:
    return Path(path).read_text().strip()


def read_proc_net_dev(path: str = PROC_NET_DEV) -> bytes:
    # Read to the end unbuffered and undecoded: the parse splits bytes, and a text layer would
    # only add a decode and a copy of the whole table.
    with open(path, "rb", buffering=0) as f:
        return f.readall()


class KernelTable:
    """The counter source of every host link (agent.sources.CounterSource): the whole table in
    one read, whatever NICs are asked for. By default a netlink stats dump, and /proc/net/dev
    from the first time that fails on (a kernel without RTM_GETSTATS) on; `read_text`: that
    text's source alone (tests hand in a table)."""

    def __init__(
        self,
        read_text: Callable[[], str | bytes] | None = None,
        netlink: Callable[[], LinkCounters] | None = None,
    ) -> None:
        self._read_text = read_text or read_proc_net_dev
        self._netlink: Callable[[], LinkCounters] | None = None
        if read_text is None:
            self._netlink = netlink or NetlinkStats().read

    def claims(self, nic: NicInfo) -> bool:
        return False  # it counts links, found by the topology, not NICs without one

    def read(self, nics: Sequence[tuple[str, DomainInfo, NicInfo]] = ()) -> CounterTable:
        if self._netlink is not None:
            try:
                stats = self._netlink()
            except OSError as exc:
                log.warning("netlink stats dump failed (%s): reading %s from now on", exc, PROC_NET_DEV)
                self._netlink = None
            else:
                return CounterTable(
                    [], stats.rx_bytes, stats.rx_packets, stats.tx_bytes, stats.tx_packets, stats.ifindexes
                )
        return parse_counter_table(self._read_text())

    def close(self) -> None:
        owner = getattr(self._netlink, "__self__", None)
        if isinstance(owner, NetlinkStats):
            owner.close()


def to_sample(key: CounterKey, stats: Stats) -> CounterSample:
    rx_bytes, rx_packets, tx_bytes, tx_packets = stats
    return CounterSample(
        key=key, rx_bytes=rx_bytes, tx_bytes=tx_bytes, rx_packets=rx_packets, tx_packets=tx_packets
    )


class CounterReader:
    """Reads the table once per poll and keys each interface by (boot id, ifindex, name)."""

    def __init__(
        self,
        boot_id: str,
        links: Callable[[], Mapping[str, int]],
        read_text: Callable[[], str | bytes] = read_proc_net_dev,
    ) -> None:
        self.boot_id = boot_id
        self._links = links
        self._read_text = read_text

    def read(self) -> dict[str, CounterSample]:
        """name -> sample for every interface that has both counters and a known ifindex."""
        table = parse_proc_net_dev(self._read_text())
        links = self._links()
        samples: dict[str, CounterSample] = {}
        for name, stats in table.items():
            ifindex = links.get(name)
            if ifindex is None:
                # Created after the topology's last update: its link event will bring the ifindex.
                log.debug("no ifindex yet for %s, skipped this poll", name)
                continue
            samples[name] = to_sample(CounterKey(self.boot_id, ifindex, name), stats)
        return samples


def read_link_mac(name: str) -> str | None:
    """A link's MAC address from sysfs (the namespace's own /sys under `ip netns exec`); None
    for a bridge, which takes the MAC of one of its ports and is never a VM's NIC."""
    base = Path("/sys/class/net") / name
    try:
        if (base / "bridge").exists():
            return None
        return (base / "address").read_text().strip().lower()
    except OSError:
        return None
