"""One-pass counter reading: the /proc/net/dev parser and the reader's keying by ifindex."""

from __future__ import annotations

import pytest

from kvmeter.agent.counters import (
    CounterReader,
    CounterTableError,
    parse_counter_table,
    parse_proc_net_dev,
    read_boot_id,
)
from kvmeter.agent.model import CounterKey

# Captured from a KVM host (Linux 5.14, EL9), shortened; note the wide rx_bytes glued to the colon.
TABLE = """\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo: 1296054   12004    0    0    0     0          0         0  1296054   12004    0    0    0     0       0          0
  eno1:123456789012 98765432    0   12    0     0          0      4411 987654321098 87654321    0    0    0     0       0          0
cloudbr0:  5000      50    0    0    0     0          0         0     6000      60    0    0    0     0       0          0
 vnet12:     742       9    0    0    0     0          0         0    18446744073709551615 3    0    0    0     0       0          0
"""  # noqa: E501


def test_parse_takes_bytes_and_packets_per_direction() -> None:
    table = parse_proc_net_dev(TABLE)
    assert table == {
        "lo": (1296054, 12004, 1296054, 12004),
        "eno1": (123456789012, 98765432, 987654321098, 87654321),
        "cloudbr0": (5000, 50, 6000, 60),
        "vnet12": (742, 9, 18446744073709551615, 3),
    }


@pytest.mark.parametrize("text", [TABLE, TABLE.replace("eno1:1", "eno1: 1")])
def test_columns_follow_the_table_order_on_both_parses(text: str) -> None:
    # rx_bytes glued to the colon sends the table to the careful parse; the columns are the same.
    table = parse_counter_table(text)
    assert table.names == ["lo", "eno1", "cloudbr0", "vnet12"]
    assert table.rx_bytes == [1296054, 123456789012, 5000, 742]
    assert table.rx_packets == [12004, 98765432, 50, 9]
    assert table.tx_bytes == [1296054, 987654321098, 6000, 18446744073709551615]
    assert table.tx_packets == [12004, 87654321, 60, 3]
    assert table.as_dict() == parse_proc_net_dev(TABLE)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "header missing"),
        (TABLE + " vnet13 1 2 3\n", "line 7 malformed"),
        (TABLE + " vnet13: 1 2 3\n", "line 7 malformed"),
        (TABLE + " vnet13: 1 x 0 0 0 0 0 0 1 1\n", "line 7"),
    ],
)
def test_parse_rejects_malformed_tables(text: str, message: str) -> None:
    with pytest.raises(CounterTableError, match=message):
        parse_proc_net_dev(text)


def test_reader_keys_by_boot_ifindex_and_name_and_skips_unknown_links() -> None:
    reads = []

    def read_text() -> str:
        reads.append(1)
        return TABLE

    reader = CounterReader("boot-1", links=lambda: {"lo": 1, "vnet12": 44}, read_text=read_text)
    samples = reader.read()
    assert sorted(samples) == ["lo", "vnet12"]
    v = samples["vnet12"]
    assert v.key == CounterKey("boot-1", 44, "vnet12")
    assert (v.rx_bytes, v.rx_packets, v.tx_bytes, v.tx_packets) == (742, 9, 18446744073709551615, 3)
    assert reads == [1]  # one read of the table per poll


def test_reads_this_machines_real_table_and_boot_id() -> None:
    boot_id = read_boot_id()
    assert len(boot_id) == 36
    reader = CounterReader(boot_id, links=lambda: {"lo": 1})
    assert reader.read()["lo"].key == CounterKey(boot_id, 1, "lo")
